// Prometheus text exposition (version 0.0.4) -> per-upstream figures for the upstreams page.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/;
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/gy;

function unescapeLabel(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

export function parseLabels(text) {
  const labels = {};
  LABEL.lastIndex = 0;
  let m;
  while (LABEL.lastIndex < text.length && (m = LABEL.exec(text)) !== null) labels[m[1]] = unescapeLabel(m[2]);
  return labels;
}

/** Every sample of the text: [{name, labels, value}]; comments and malformed lines are skipped. */
export function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    samples.push({ name: m[1], labels: parseLabels(m[2] ?? ""), value: parseValue(m[3]) });
  }
  return samples;
}

const P = "batchyard_upstream_";

function blank() {
  return { healthy: null, limit: null, inFlight: null, requests: 0, errors: 0, byStatus: {}, sum: 0, count: 0, buckets: new Map() };
}

const add = (a, b) => (a === null ? b : a + b);

/**
 * Per upstream (label `upstream`): health (every process reporting it healthy), the concurrency limit and the
 * requests in flight (summed over the processes that report them), requests and errors (non-2xx statuses), and
 * the latency histogram. Samples with other labels (a process id, say) are added up.
 */
export function summarize(samples) {
  const ups = new Map();
  const of = (labels) => {
    const name = labels.upstream ?? "";
    if (!ups.has(name)) ups.set(name, blank());
    return ups.get(name);
  };
  for (const { name, labels, value } of samples) {
    if (!name.startsWith(P) || labels.upstream === undefined) continue;
    const u = of(labels);
    switch (name.slice(P.length)) {
      case "healthy":
        u.healthy = u.healthy === null ? value >= 1 : u.healthy && value >= 1;
        break;
      case "concurrency_limit":
        u.limit = add(u.limit, value);
        break;
      case "in_flight":
        u.inFlight = add(u.inFlight, value);
        break;
      case "requests_total": {
        const status = labels.status ?? "";
        u.requests += value;
        u.byStatus[status] = (u.byStatus[status] ?? 0) + value;
        if (!/^2\d\d$/.test(status)) u.errors += value;
        break;
      }
      case "request_duration_seconds_sum":
        u.sum += value;
        break;
      case "request_duration_seconds_count":
        u.count += value;
        break;
      case "request_duration_seconds_bucket": {
        const le = parseValue(labels.le ?? "+Inf");
        u.buckets.set(le, (u.buckets.get(le) ?? 0) + value);
        break;
      }
      default:
        break;
    }
  }
  return [...ups.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([upstream, u]) => ({
      upstream,
      healthy: u.healthy,
      limit: u.limit,
      inFlight: u.inFlight,
      requests: u.requests,
      errors: u.errors,
      byStatus: u.byStatus,
      meanSeconds: u.count > 0 ? u.sum / u.count : null,
      p50Seconds: quantile(0.5, u.buckets),
      p95Seconds: quantile(0.95, u.buckets),
    }));
}

/** histogram_quantile as Prometheus computes it: linear interpolation inside the bucket holding the rank. */
export function quantile(q, buckets) {
  const sorted = [...buckets.entries()].sort(([a], [b]) => a - b);
  if (sorted.length === 0) return null;
  const total = sorted[sorted.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, cumulative] of sorted) {
    if (cumulative >= rank) {
      if (le === Infinity) return lower; // the highest finite bound, as Prometheus answers
      const inBucket = cumulative - below;
      return inBucket > 0 ? lower + ((le - lower) * (rank - below)) / inBucket : le;
    }
    lower = le;
    below = cumulative;
  }
  return lower;
}
