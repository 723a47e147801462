// What the headless-Chromium scripts share: their options (the JSON in argv[2]; timeoutMs
// for each wait, default 60000), the JSON event lines they print on stdout, and Chromium
// started the same way (Debian's /usr/bin/chromium, no sandbox, no GPU, no network of its
// own: only what the page asks for).

import { chromium } from 'playwright-core'

export const options = JSON.parse(process.argv[2])
export const timeout = options.timeoutMs ?? 60000

export function emit(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`)
}

export function launchChromium() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true, // playwright-core adds --headless
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    timeout,
  })
}

// Report the page's Content-Security-Policy violations as console errors (then `console`
// events, as the scripts' console listeners print them).
export async function reportCspViolations(page) {
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`)
    })
  })
}
