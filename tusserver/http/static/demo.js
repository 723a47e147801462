// The demo upload page of tusserver: Uppy's Dashboard with its tus uploader.
//
// Settings, all optional, from the query string or the URL fragment:
//   endpoint   the tus endpoint (default: this server's, from <meta name="tus-endpoint">)
//   token      a tusserver token, sent as `Authorization: Bearer ...`; read from the fragment
//              only (a fragment never reaches a server or its logs), then kept in this tab's
//              sessionStorage so that a reload still has it, and removed from the address bar
//   chunkSize  bytes per PATCH (default: one PATCH per file; set it behind proxies that cap
//              request bodies)
// The plain form below Uppy needs none of this: it posts to this server's endpoint, which
// answers 303 back to this page with `?uploads=<id>,<id>`; the script only links those ids.
// Resuming: tus-js-client keeps each unfinished upload's URL in localStorage (its
// fingerprint), and Uppy's Golden Retriever keeps the selected files (up to 10 MiB each in
// IndexedDB), so after a reload the upload goes on; a bigger file is picked again and then
// resumes where it stopped.
'use strict'
;(() => {
  const TOKEN_KEY = 'tusserver-demo-token'
  const query = new URLSearchParams(window.location.search)
  const fragment = new URLSearchParams(window.location.hash.slice(1))

  function meta(name) {
    const element = document.querySelector(`meta[name="${name}"]`)
    return element ? element.content : ''
  }

  function takeToken() {
    const fromFragment = fragment.get('token')
    if (!fromFragment) return window.sessionStorage.getItem(TOKEN_KEY)
    window.sessionStorage.setItem(TOKEN_KEY, fromFragment)
    fragment.delete('token')
    const rest = fragment.toString()
    const address = window.location.pathname + window.location.search + (rest ? `#${rest}` : '')
    window.history.replaceState(null, '', address)
    return fromFragment
  }

  function notify(text) {
    const notice = document.getElementById('notice')
    notice.textContent = text
    notice.hidden = !text
  }

  const token = takeToken()
  const endpointSetting = query.get('endpoint') || fragment.get('endpoint') || meta('tus-endpoint')
  const endpoint = new URL(endpointSetting, window.location.href).href
  const chunkSize = Number(query.get('chunkSize') || fragment.get('chunkSize')) || Infinity
  document.getElementById('endpoint').textContent = endpoint
  if (meta('tus-secured') === 'true' && !token) {
    notify(
      'This server needs a token: open this page as …/#token=<token> ' +
        '(the fragment after # never leaves your browser).',
    )
  }

  const uppy = new Uppy.Uppy({ id: 'tusserver-demo', autoProceed: false })
    .use(Uppy.Dashboard, {
      inline: true,
      target: '#uploader',
      width: '100%',
      height: 460,
      fileManagerSelectionType: 'both',
      showProgressDetails: true,
      proudlyDisplayPoweredByUppy: false,
      theme: 'auto',
    })
    .use(Uppy.Tus, {
      endpoint,
      chunkSize,
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      retryDelays: [0, 1000, 3000, 5000, 10000],
      removeFingerprintOnSuccess: true,
    })
    .use(Uppy.GoldenRetriever)

  uppy.on('upload-success', (file, response) => {
    const item = document.createElement('li')
    const link = document.createElement('a')
    link.href = response.uploadURL
    link.textContent = file.name
    item.append(link, ` (${file.size} bytes)`)
    document.getElementById('uploaded').append(item)
    document.getElementById('finished').hidden = false
  })
  uppy.on('upload-error', (file, error) => {
    const status = error && error.originalResponse ? error.originalResponse.getStatus() : 0
    if (status === 401 || status === 403) notify(`The server refused the token (${status}).`)
  })

  const formUploads = (query.get('uploads') || '').split(',').filter(Boolean)
  if (formUploads.length) {
    const ownEndpoint = new URL(meta('tus-endpoint'), window.location.href)
    const list = document.getElementById('form-uploads')
    for (const id of formUploads) {
      const item = document.createElement('li')
      const link = document.createElement('a')
      link.href = new URL(encodeURIComponent(id), ownEndpoint).href
      link.textContent = id
      item.append(link)
      list.append(item)
    }
    list.hidden = false
  }

  // For people (and tests) who want to look inside from the browser's console.
  window.tusserverDemo = { uppy, endpoint }
})()
