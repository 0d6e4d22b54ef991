// The error file of a batch, grouped in the browser by error code / response status.

export const READ_CAP = 5 * 1024 * 1024;
export const EXAMPLES = 3;

/** The group of one error-file line: `error.code` for lines batchyard ended, `HTTP <status> <code>` otherwise. */
export function groupOf(line) {
  if (line && typeof line === "object") {
    if (line.error && typeof line.error === "object") return String(line.error.code ?? "error");
    const response = line.response;
    if (response && typeof response === "object") {
      const code = response.body?.error?.code ?? response.body?.error?.type;
      return `HTTP ${response.status_code}${code ? ` ${code}` : ""}`;
    }
  }
  return "unreadable line";
}

function messageOf(line) {
  if (line?.error && typeof line.error === "object") return String(line.error.message ?? "");
  const body = line?.response?.body;
  if (body?.error?.message !== undefined) return String(body.error.message);
  return body === undefined ? "" : JSON.stringify(body).slice(0, 300);
}

/** Groups of the lines in `text` (the file's first bytes: a cut last line is left out), largest first. */
export function groupErrors(text, truncated) {
  const lines = text.split("\n");
  if (truncated) lines.pop();
  const groups = new Map();
  let read = 0;
  lines.forEach((raw, index) => {
    if (!raw.trim()) return;
    read += 1;
    let line = null;
    try {
      line = JSON.parse(raw);
    } catch {
      line = null;
    }
    const key = groupOf(line);
    if (!groups.has(key)) groups.set(key, { key, count: 0, examples: [] });
    const g = groups.get(key);
    g.count += 1;
    if (g.examples.length < EXAMPLES) {
      g.examples.push({ lineNumber: index + 1, customId: line?.custom_id ?? "", message: messageOf(line) });
    }
  });
  return { read, groups: [...groups.values()].sort((a, b) => b.count - a.count || a.key.localeCompare(b.key)) };
}
