// Post the demo page's plain form (no Uppy, no fetch: the browser's own multipart/form-data
// submission) from Debian's headless Chromium with playwright-core, as a person would: type a
// note, pick files in the file input (playwright sets them through the DevTools protocol's
// DOM.setFileInputFiles), press the button, and follow the server's 303 back to the page.
//
// Usage: node browser_form.mjs '<options as JSON>'
// Options: pageUrl, files (paths), note, screenshot (PNG path), timeoutMs (default 60000)
//
// Every line on stdout is one JSON event: console (errors and warnings of the page, CSP
// violations among them), response (each answer to a POST of the form: status, location,
// content type), landed (the address after the redirect and the ids the page lists),
// screenshot; `error` when something went wrong.

import { emit, launchChromium, options, reportCspViolations, timeout } from './browser_common.mjs'

const browser = await launchChromium()

try {
  const page = await browser.newPage()
  page.setDefaultTimeout(timeout)
  await reportCspViolations(page)
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') {
      emit('console', { type: message.type(), text: message.text() })
    }
  })
  page.on('pageerror', (error) => emit('console', { type: 'pageerror', text: String(error) }))
  page.on('response', (response) => {
    if (response.request().method() !== 'POST') return
    const headers = response.headers()
    emit('response', {
      url: response.url(),
      status: response.status(),
      location: headers.location ?? null,
      contentType: headers['content-type'] ?? null,
    })
  })

  await page.goto(options.pageUrl)
  const form = page.locator('#plain-form')
  await form.locator('input[name=note]').fill(options.note)
  await form.locator('input[type=file]').setInputFiles(options.files)
  await Promise.all([
    page.waitForURL((url) => url.searchParams.has('uploads')),
    form.locator('button[type=submit]').click(),
  ])
  await page.locator('#form-uploads li').first().waitFor()
  emit('landed', {
    url: page.url(),
    listed: await page.locator('#form-uploads li a').allInnerTexts(),
    links: await page.locator('#form-uploads li a').evaluateAll((links) => links.map((a) => a.href)),
  })
  await page.screenshot({ path: options.screenshot, fullPage: true })
  emit('screenshot', { path: options.screenshot })
} catch (error) {
  emit('error', { message: String(error && error.stack ? error.stack : error) })
  process.exitCode = 1
} finally {
  await browser.close()
}
