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
// Batches: the files of one upload run (a dropped folder, several files) go as one batch of
// the server (POST <endpoint>batches before the run; each file's `batch` and `relativePath`
// metadata), so the service behind it hears about them once, when all are there; the page
// shows the batch's state when the run ends. A file keeps its batch in its Uppy metadata,
// so a run that resumes it after a reload or an error fills the batch it started in.
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

  function batchesUrl(endpointUrl) {
    const url = new URL(endpointUrl)
    url.pathname = `${url.pathname.replace(/\/+$/, '')}/batches`
    url.hash = ''
    return url.href
  }

  // A file's path in its batch: the path of a dropped or picked folder's file as Uppy gives
  // it (sometimes with a leading slash), else the file's name; made unique within the run.
  function memberPath(file, taken) {
    const given = (file.meta.relativePath || file.name || file.id).replace(/^\/+/, '')
    let path = given
    for (let n = 2; taken.has(path); n += 1) path = given.replace(/(\.[^./]*)?$/, ` (${n})$1`)
    taken.add(path)
    return path
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
  const authHeaders = token ? { Authorization: `Bearer ${token}` } : {}
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
      headers: authHeaders,
      retryDelays: [0, 1000, 3000, 5000, 10000],
      removeFingerprintOnSuccess: true,
      // Every metadata field a file has goes as Upload-Metadata: name and type (as filename
      // and filetype), relativePath and batch (set below, never left null: a null would go
      // as the text "null").
      allowedMetaFields: true,
    })
    .use(Uppy.GoldenRetriever)

  async function openBatch(files) {
    const response = await fetch(batchesUrl(endpoint), {
      method: 'POST',
      headers: { ...authHeaders, 'Content-Type': 'application/json' },
      body: JSON.stringify({ files }),
    })
    if (!response.ok) throw new Error(`the server answered ${response.status}`)
    return response.json()
  }

  async function readBatch(id) {
    const response = await fetch(`${batchesUrl(endpoint)}/${encodeURIComponent(id)}`, {
      headers: authHeaders,
      cache: 'no-store',
    })
    if (!response.ok) throw new Error(`the server answered ${response.status}`)
    return response.json()
  }

  function showBatches(lines, state) {
    const status = document.getElementById('batch-status')
    status.textContent = lines.join('\n')
    status.hidden = lines.length === 0
    status.dataset.state = state
  }

  // Before a run: the files that have no batch yet get one, together.
  uppy.addPreProcessor(async (fileIDs) => {
    const fresh = fileIDs.map((id) => uppy.getFile(id)).filter((file) => !file.meta.batch)
    if (fresh.length === 0) return
    showBatches([`opening a batch for ${fresh.length} files…`], '')
    let batch = null
    try {
      batch = await openBatch(fresh.length)
    } catch (error) {
      showBatches([`no batch (${error.message}): the files go as separate uploads`], 'none')
    }
    const taken = new Set()
    for (const file of fresh) {
      const meta = { relativePath: memberPath(file, taken) }
      if (batch) meta.batch = batch.id
      uppy.setFileMeta(file.id, meta)
    }
  })

  function describeBatch(view) {
    const { files, files_completed: done } = view.progress
    const plural = files === 1 ? '' : 's'
    if (view.state === 'completed') return `batch ${view.id}: completed, ${files} file${plural}`
    const expected = view.expected.files ?? files
    return `batch ${view.id}: ${view.state}, ${done} of ${expected} files complete`
  }

  // After a run: the state of each batch its files are in (the server may complete a batch
  // a moment after the last file's answer, once it has hashed a resumed file: ask again).
  uppy.on('complete', async (result) => {
    const files = [...(result.successful || []), ...(result.failed || [])]
    const ids = [...new Set(files.map((file) => file.meta.batch).filter(Boolean))]
    if (ids.length === 0) return
    let lines = []
    let isComplete = false
    for (let attempt = 0; attempt < 20 && !isComplete; attempt += 1) {
      if (attempt > 0) await new Promise((resolve) => setTimeout(resolve, 250))
      try {
        const views = await Promise.all(ids.map(readBatch))
        lines = views.map(describeBatch)
        isComplete = views.every((view) => view.state === 'completed')
      } catch (error) {
        lines = ids.map((id) => `batch ${id}: cannot read it (${error.message})`)
        break
      }
      if (result.failed && result.failed.length > 0) break // it cannot complete now
    }
    showBatches(lines, isComplete ? 'completed' : 'incomplete')
  })

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
