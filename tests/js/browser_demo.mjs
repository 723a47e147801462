// Drive tusserver's demo page in Debian's headless Chromium with playwright-core, as a person
// would: pick a file (and a folder) in Uppy's Dashboard, press upload, (optionally) reload
// mid-upload and resume, wait for the batch's state on the page, then take a screenshot.
//
// Usage: node browser_demo.mjs '<options as JSON>'
// Options: pageUrl, file, screenshot (PNG path), and optionally
//   folder                 a folder picked too, through the Dashboard's folder input (its
//                          files get their relativePath from the browser, as when dropped)
//   expectUploads          how many files the page lists as uploaded at the end (default 1)
//   reloadAfterBytes       reload the page once the upload has sent this many bytes
//   uploadBytesPerSecond   throttle the browser's uploads (Chromium's own network emulation)
//                          until the reload, so that the reload lands while a PATCH is running
//   reselectAfterReload    pick the file again after the reload, as Uppy asks for files that
//                          its Golden Retriever could not keep (over 10 MiB)
//   expectBlocked          the endpoint is expected to refuse this origin: stop once Chromium
//                          reports the CORS block instead of waiting for a success
//   timeoutMs              for each wait (default 60000)
//
// Every line on stdout is one JSON event: request (to the tus endpoint, with the phase
// before/after the reload), kept (HEAD from Node after the reload: the bytes the server kept),
// console (errors and warnings of the page, CSP violations among them), address (the page's
// URL once loaded), success (with every uploaded link), batch (the page's batch status once
// the run ended), blocked, screenshot; `error` when something went wrong.

import { emit, launchChromium, options, reportCspViolations, timeout } from './browser_common.mjs'

const browser = await launchChromium()

let phase = 'before-reload'
let sawCorsBlock = null

try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } })
  const page = await context.newPage()
  page.setDefaultTimeout(timeout)
  await reportCspViolations(page)
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') {
      emit('console', { type: message.type(), text: message.text(), phase })
      if (/CORS policy/.test(message.text()) && sawCorsBlock) sawCorsBlock(message.text())
    }
  })
  page.on('pageerror', (error) => emit('console', { type: 'pageerror', text: String(error), phase }))

  const endpoint = new URL(new URL(options.pageUrl).searchParams.get('endpoint') ?? '/files/', options.pageUrl)
  const uploadUrls = new Set()
  page.on('request', (request) => {
    if (!request.url().startsWith(endpoint.href)) return
    const offset = request.headers()['upload-offset']
    emit('request', { phase, method: request.method(), url: request.url(), offset })
  })
  page.on('response', (response) => {
    const location = response.headers().location
    if (response.request().method() !== 'POST' || !location) return
    const url = new URL(location, endpoint)
    if (!url.pathname.includes('/batches/')) uploadUrls.add(url.href) // uploads, not batches
  })

  const cdp = await context.newCDPSession(page)
  async function throttle(bytesPerSecond) {
    await cdp.send('Network.enable')
    await cdp.send('Network.emulateNetworkConditions', {
      offline: false,
      latency: 0,
      downloadThroughput: -1,
      uploadThroughput: bytesPerSecond ?? -1,
    })
  }

  await page.goto(options.pageUrl)
  await page.locator('.uppy-Dashboard').waitFor()
  emit('address', { url: page.url() })

  if (options.folder) {
    // the folder first: once the Dashboard lists files, its inputs are in the "add more" panel
    await page.locator('#uploader input[type=file][webkitdirectory]').first().setInputFiles(options.folder)
    await page.locator('.uppy-DashboardContent-addMore').first().click()
  }
  await page.locator('#uploader input[type=file]:not([webkitdirectory])').first().setInputFiles(options.file)
  if (options.uploadBytesPerSecond) await throttle(options.uploadBytesPerSecond)
  if (options.reloadAfterBytes !== undefined) {
    await page.evaluate((threshold) => {
      window.tusserverDemo.uppy.on('upload-progress', (_file, progress) => {
        if (progress.bytesUploaded >= threshold && !window.reloadStarted) {
          window.reloadStarted = true
          window.location.reload() // the running PATCH is cut off
        }
      })
    }, options.reloadAfterBytes)
  }

  const blocked = new Promise((resolve) => {
    sawCorsBlock = resolve
  })
  const uploadButton = page.locator('.uppy-StatusBar-actionBtn--upload')
  if (options.reloadAfterBytes !== undefined) {
    const reloaded = page.waitForEvent('load')
    await uploadButton.click()
    await reloaded
    phase = 'after-reload'
    await page.locator('.uppy-Dashboard').waitFor()
    await throttle(-1)
    for (const url of uploadUrls) {
      const head = await fetch(url, { method: 'HEAD', headers: { 'Tus-Resumable': '1.0.0' } })
      emit('kept', { url, status: head.status, offset: Number(head.headers.get('upload-offset')) })
    }
    // Golden Retriever has brought the file back (files over 10 MiB only by name: the person
    // picks them again); the same button then resumes the upload.
    await page.getByText('Session restored').waitFor()
    if (options.reselectAfterReload) {
      await page.getByRole('button', { name: 'Re-select' }).click()
      await page.locator('#uploader input[type=file]:not([webkitdirectory])').first().setInputFiles(options.file)
    }
    await page.getByText('We restored all files').waitFor()
    await page.screenshot({ path: options.screenshot.replace(/\.png$/, '-restored.png') })
  }
  await uploadButton.click()

  if (options.expectBlocked) {
    let timer
    const text = await Promise.race([
      blocked,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('no CORS block seen')), timeout)
      }),
    ])
    clearTimeout(timer)
    emit('blocked', { text })
  } else {
    const link = page.locator('#uploaded li a')
    await link.first().waitFor()
    await page.waitForFunction(
      (count) => document.querySelectorAll('#uploaded li a').length >= count,
      options.expectUploads ?? 1,
    )
    const links = await link.evaluateAll((anchors) =>
      anchors.map((anchor) => ({ name: anchor.textContent, url: anchor.href })),
    )
    emit('success', {
      url: links[0].url,
      links,
      text: await page.locator('#uploaded').innerText(),
      address: page.url(),
    })
    // the page reads the batch once the run has ended, and says what it found
    const status = page.locator('#batch-status:not([data-state=""])[data-state]')
    await status.waitFor()
    const state = await status.getAttribute('data-state')
    emit('batch', { state, text: await status.innerText() })
  }
  await page.screenshot({ path: options.screenshot, fullPage: true })
  emit('screenshot', { path: options.screenshot })
} catch (error) {
  emit('error', { message: String(error && error.stack ? error.stack : error) })
  process.exitCode = 1
} finally {
  await browser.close()
}
