// tus-js-client's browser build (dist/tus.js) in Debian's headless Chromium, driven by
// playwright-core, on a page that this script serves from http://localhost:<a free port> (so
// every request to the endpoint, on 127.0.0.1, is cross-origin and CORS is real; a loopback
// page, because Chromium keeps other pages from loopback addresses): upload a picked file in one of its protocols, abort() while a PATCH is
// running (the browser's upload is throttled so that the abort lands mid-request), then
// resume with a new Upload from the URL it stored (localStorage) and finish.
//
// Usage: node browser_tus_draft.mjs '<options as JSON>'
// Options: endpoint, file, protocol ('ietf-draft-03', 'ietf-draft-05'
// or 'tus-v1'), chunkSize, abortAtBytes, uploadBytesPerSecond (until the abort), and
// optionally timeoutMs (default 60000).
//
// Every line on stdout is one JSON event: request and response (to the endpoint, as Chromium
// sent and received them, with the phase), aborted (what the page knew then), kept (HEAD from
// Node after the abort: what the server kept), console (errors and warnings of the page),
// success; `error` when something went wrong.

import * as fs from 'node:fs'
import * as http from 'node:http'
import { createRequire } from 'node:module'
import { emit, launchChromium, options, timeout } from './browser_common.mjs'

const tusBundle = createRequire(import.meta.url).resolve('tus-js-client/dist/tus.js')
const INTEROP = { 'ietf-draft-03': '5', 'ietf-draft-05': '6' }

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>tus-js-client, draft protocols</title>
<input type="file" id="file">
<script src="/tus.js"></script>
<script>
  // One upload of the picked file; resolves when it is aborted (at abortAtBytes sent) or done.
  window.upload = (settings) => new Promise((resolve, reject) => {
    const file = document.getElementById('file').files[0]
    const upload = new tus.Upload(file, {
      endpoint: settings.endpoint,
      protocol: settings.protocol,
      chunkSize: settings.chunkSize,
      retryDelays: null,
      removeFingerprintOnSuccess: true,
      onProgress(bytesSent) {
        if (settings.abortAtBytes !== undefined && bytesSent >= settings.abortAtBytes && !upload.stopping) {
          upload.stopping = true
          upload.abort().then(() => resolve({ state: 'aborted', url: upload.url, bytesSent }))
        }
      },
      onSuccess() { resolve({ state: 'success', url: upload.url }) },
      onError(error) { reject(new Error(String(error))) },
    })
    if (!settings.resume) { upload.start(); return }
    upload.findPreviousUploads().then((previous) => {
      if (previous.length === 0) { reject(new Error('no previous upload stored')); return }
      upload.resumeFromPreviousUpload(previous[0])
      upload.start()
    })
  })
</script>
`

const pageServer = http.createServer((request, response) => {
  if (request.url === '/tus.js') {
    response.writeHead(200, { 'Content-Type': 'text/javascript' })
    response.end(fs.readFileSync(tusBundle))
  } else {
    response.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' })
    response.end(PAGE)
  }
})
await new Promise((resolve) => pageServer.listen(0, '127.0.0.1', resolve))
const pageOrigin = `http://localhost:${pageServer.address().port}`

const browser = await launchChromium()

let phase = 'first'
try {
  const context = await browser.newContext()
  const page = await context.newPage()
  page.setDefaultTimeout(timeout)
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') {
      emit('console', { type: message.type(), text: message.text(), phase })
    }
  })
  page.on('pageerror', (error) => emit('console', { type: 'pageerror', text: String(error), phase }))
  page.on('request', (request) => {
    if (!request.url().startsWith(options.endpoint)) return
    emit('request', { phase, method: request.method(), url: request.url(), headers: request.headers() })
  })
  page.on('response', (response) => {
    if (!response.url().startsWith(options.endpoint)) return
    const method = response.request().method()
    emit('response', { phase, method, url: response.url(), status: response.status(), headers: response.headers() })
  })

  const cdp = await context.newCDPSession(page)
  await cdp.send('Network.enable')
  async function throttle(bytesPerSecond) {
    await cdp.send('Network.emulateNetworkConditions', {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: bytesPerSecond,
    })
  }

  await page.goto(`${pageOrigin}/tus-draft.html`)
  await page.locator('#file').setInputFiles(options.file)
  const settings = { endpoint: options.endpoint, protocol: options.protocol, chunkSize: options.chunkSize }

  await throttle(options.uploadBytesPerSecond)
  const first = await page.evaluate((s) => window.upload(s), { ...settings, abortAtBytes: options.abortAtBytes })
  emit('aborted', first)
  await throttle(-1)
  const headers = options.protocol in INTEROP ? { 'Upload-Draft-Interop-Version': INTEROP[options.protocol] } : { 'Tus-Resumable': '1.0.0' }
  const head = await fetch(first.url, { method: 'HEAD', headers })
  emit('kept', { url: first.url, status: head.status, offset: Number(head.headers.get('upload-offset')) })

  phase = 'resumed'
  const resumed = await page.evaluate((s) => window.upload(s), { ...settings, resume: true })
  emit(resumed.state, resumed)
} catch (error) {
  emit('error', { message: String(error && error.stack ? error.stack : error) })
  process.exitCode = 1
} finally {
  await browser.close()
  pageServer.close()
}
