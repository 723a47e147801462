// Upload one file to a tus endpoint with tus-js-client in Node, as an app would.
//
// Usage: node tus_upload.mjs '<options as JSON>'
// Options: endpoint, file, and optionally token, metadata, chunkSize, overridePatchMethod,
// uploadLengthDeferred (the file is then read as a stream of unknown length), parallelUploads,
// protocol ('tus-v1', 'ietf-draft-03' or 'ietf-draft-05'), uploadDataDuringCreation,
// storage (a JSON file for FileUrlStorage: fingerprints of unfinished uploads), resume (look
// the file up in `storage` and go on from there), stopAfterBytes (abort() once that many bytes
// are accepted), killAfterBytes (SIGKILL this process then, as when a phone kills the app).
//
// Every line on stdout is one JSON event: request (what tus-js-client is about to send),
// response (its status and the protocol's fields), previous (uploads found in storage),
// progress, aborted, success or error.

import * as fs from 'node:fs'
import { PassThrough } from 'node:stream'
import * as tus from 'tus-js-client'

const options = JSON.parse(process.argv[2])

function emit(event, fields = {}) {
  // stdout is a pipe: on Linux its writes are synchronous, so a line survives a SIGKILL
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`)
}

const SHOWN_HEADERS = [
  'Upload-Offset',
  'Upload-Length',
  'Upload-Defer-Length',
  'Upload-Concat',
  'Upload-Metadata',
  'X-HTTP-Method-Override',
  'Tus-Resumable',
  'Upload-Draft-Interop-Version',
  'Upload-Complete',
  'Content-Type',
]
const SHOWN_RESPONSE_HEADERS = ['Location', 'Upload-Offset', 'Upload-Complete', 'Upload-Length']

function describe(request) {
  const headers = {}
  for (const name of SHOWN_HEADERS) {
    const value = request.getHeader(name)
    if (value !== undefined && value !== null) headers[name] = String(value)
  }
  headers.Authorization = request.getHeader('Authorization') ? 'present' : 'absent'
  return { method: request.getMethod(), url: request.getURL(), headers }
}

function source() {
  if (options.uploadLengthDeferred) {
    // A plain stream (not an fs.ReadStream): tus-js-client cannot know its length in advance.
    return fs.createReadStream(options.file).pipe(new PassThrough())
  }
  return fs.createReadStream(options.file)
}

const uploadOptions = {
  endpoint: options.endpoint,
  metadata: options.metadata ?? {},
  headers: options.token ? { Authorization: `Bearer ${options.token}` } : {},
  retryDelays: null, // a failure shows at once instead of hiding behind retries
  removeFingerprintOnSuccess: true,
  onBeforeRequest(request) {
    emit('request', describe(request))
  },
  onAfterResponse(request, response) {
    const headers = {}
    for (const name of SHOWN_RESPONSE_HEADERS) {
      const value = response.getHeader(name)
      if (value !== undefined && value !== null) headers[name] = String(value)
    }
    emit('response', { method: request.getMethod(), url: request.getURL(), status: response.getStatus(), headers })
  },
  onProgress(bytesSent, bytesTotal) {
    emit('progress', { bytesSent, bytesTotal })
  },
  onChunkComplete(_chunkSize, bytesAccepted) {
    if (options.killAfterBytes !== undefined && bytesAccepted >= options.killAfterBytes) {
      emit('killing', { url: upload.url, bytesAccepted })
      process.kill(process.pid, 'SIGKILL')
    }
    if (options.stopAfterBytes !== undefined && bytesAccepted >= options.stopAfterBytes) {
      upload.abort().then(() => {
        emit('aborted', { url: upload.url, bytesAccepted })
        process.exit(0)
      })
    }
  },
  onSuccess() {
    emit('success', { url: upload.url })
  },
  onError(error) {
    emit('error', { message: String(error), status: error.originalResponse?.getStatus() })
    process.exitCode = 1
  },
}
const PASSED_ON = [
  'chunkSize',
  'overridePatchMethod',
  'uploadLengthDeferred',
  'parallelUploads',
  'protocol',
  'uploadDataDuringCreation',
]
for (const name of PASSED_ON) {
  if (options[name] !== undefined) uploadOptions[name] = options[name]
}
if (options.storage) uploadOptions.urlStorage = new tus.FileUrlStorage(options.storage)

const upload = new tus.Upload(source(), uploadOptions)

if (options.resume) {
  const previous = await upload.findPreviousUploads()
  emit('previous', { count: previous.length, urls: previous.map((p) => p.uploadUrl) })
  if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0])
}
upload.start()
