// The public API, called with the user's key in an Authorization header (never in a URL). The key lives in
// sessionStorage: it is gone when the tab closes.

const KEY = "batchyard.apiKey";

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set(key) {
    sessionStorage.setItem(KEY, key);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && typeof body === "object" ? body.error : null;
    super(error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
  }
}

const listeners = new Set();

/** Called with the ApiError of every 401, so the app can ask for a key again. */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

function headers(extra) {
  const out = { ...extra };
  const key = session.key;
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = new ApiError(response.status, body);
  if (response.status === 401) for (const fn of listeners) fn(error);
  return error;
}

/** A raw Response (for streamed downloads and /metrics); throws ApiError when not ok. */
export async function request(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers({}), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function json(path, options) {
  const response = await request(path, options);
  return response.json();
}

/** The first `cap` bytes of a file's content, and whether there was more. */
export async function readCapped(fileId, cap) {
  const response = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  let truncated = false;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (size + value.byteLength > cap) {
      chunks.push(value.subarray(0, cap - size));
      size = cap;
      truncated = true;
      await reader.cancel();
      break;
    }
    chunks.push(value);
    size += value.byteLength;
  }
  const all = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.byteLength;
  }
  return { text: new TextDecoder().decode(all), truncated };
}

/** Save a file through the browser: fetched with the key, handed over as a blob (no key in any URL). */
export async function download(fileId) {
  const meta = await json(`/v1/files/${encodeURIComponent(fileId)}`);
  const response = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = (meta.filename || `${fileId}.jsonl`).replace(/[\\/]/g, "_");
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
