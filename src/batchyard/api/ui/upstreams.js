// The upstreams: health, concurrency limit, in flight, latency and errors, read from GET /metrics.

import { ApiError, request } from "./api.js";
import { h, number, replace } from "./dom.js";
import { parseMetrics, summarize } from "./metrics.js";
import { poll } from "./poll.js";

function ms(seconds) {
  return seconds === null || seconds === undefined ? "–" : `${number(seconds * 1000, seconds < 0.1 ? 1 : 0)} ms`;
}

function health(healthy) {
  if (healthy === null) return h("span", { class: "status" }, "unknown");
  return healthy ? h("span", { class: "status status-completed" }, "healthy") : h("span", { class: "status status-failed" }, "unhealthy");
}

function errorsCell(u) {
  const bad = Object.entries(u.byStatus)
    .filter(([s, n]) => !/^2\d\d$/.test(s) && n > 0)
    .map(([s, n]) => `${s}: ${number(n)}`)
    .join(", ");
  const rate = u.requests > 0 ? ` (${number((100 * u.errors) / u.requests, 1)}%)` : "";
  return `${number(u.errors)}${rate}${bad ? ` — ${bad}` : ""}`;
}

function row(u) {
  return h(
    "tr",
    { "data-upstream": u.upstream },
    h("td", { class: "mono" }, u.upstream),
    h("td", { class: "health" }, health(u.healthy)),
    h("td", { class: "num limit" }, number(u.limit)),
    h("td", { class: "num in-flight" }, number(u.inFlight)),
    h("td", { class: "num requests" }, number(u.requests)),
    h("td", { class: "errors" }, errorsCell(u)),
    h("td", { class: "num mean" }, ms(u.meanSeconds)),
    h("td", { class: "num p50" }, ms(u.p50Seconds)),
    h("td", { class: "num p95" }, ms(u.p95Seconds)),
  );
}

export function mount(main) {
  const status = h("p", { class: "muted", id: "upstreams-status" }, "Loading…");
  const body = h("tbody");
  const table = h(
    "table",
    { id: "upstreams" },
    h("thead", {}, h("tr", {}, ["Upstream", "Health", "Concurrency limit", "In flight", "Requests", "Errors", "Mean latency", "p50", "p95"].map((t) => h("th", {}, t)))),
    body,
  );
  const wrap = h("div", { class: "table-wrap" }, table);
  replace(main, h("h1", {}, "Upstreams"), status, wrap);
  return poll(async () => {
    let text;
    try {
      text = await (await request("/metrics")).text();
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        wrap.hidden = true;
        replace(status, "Metrics not available: this server does not expose GET /metrics.");
        status.dataset.state = "unavailable";
        return true;
      }
      throw e;
    }
    const ups = summarize(parseMetrics(text));
    wrap.hidden = ups.length === 0;
    status.dataset.state = "ok";
    replace(body, ups.map(row));
    replace(status, ups.length === 0 ? "No upstream has reported metrics yet." : `${ups.length} upstream${ups.length === 1 ? "" : "s"}, from GET /metrics, updated ${new Date().toLocaleTimeString()}`);
  });
}
