// The batches list: status, progress, counts, model, endpoint, age and throughput, refreshed every 2 s.

import { json } from "./api.js";
import { age, h, number, replace, statusBadge } from "./dom.js";
import { poll } from "./poll.js";

const LIMIT = 100;
const FINISHED_AT = ["completed_at", "failed_at", "expired_at", "cancelled_at"];

export function progressOf(batch) {
  const c = batch.request_counts ?? { total: 0, completed: 0, failed: 0 };
  return { done: c.completed + c.failed, total: c.total, completed: c.completed, failed: c.failed };
}

/** Lines per second since in_progress_at (until finalizing or the end, once there). */
export function throughput(batch, now = Date.now() / 1000) {
  if (!batch.in_progress_at) return null;
  const end = batch.finalizing_at ?? FINISHED_AT.map((k) => batch[k]).find((t) => t) ?? now;
  const seconds = end - batch.in_progress_at;
  const { done } = progressOf(batch);
  return seconds > 0 ? done / seconds : null;
}

export function progressBar(batch) {
  const { done, total } = progressOf(batch);
  const bar = h("progress", { class: "progress", max: Math.max(total, 1), value: done, "aria-label": "progress" });
  return h("div", { class: "progress-cell" }, bar, h("span", { class: "progress-text" }, total ? `${Math.floor((100 * done) / total)}%` : "–"));
}

function row(batch) {
  const { total, completed, failed } = progressOf(batch);
  const rate = throughput(batch);
  return h(
    "tr",
    { "data-batch-id": batch.id },
    h("td", { class: "mono" }, h("a", { href: `#/batches/${encodeURIComponent(batch.id)}` }, batch.id)),
    h("td", {}, statusBadge(batch.status)),
    h("td", {}, progressBar(batch)),
    h("td", { class: "num counts" }, `${number(completed)} ok · ${number(failed)} failed · ${number(total)}`),
    h("td", {}, batch.model ?? "–"),
    h("td", { class: "mono" }, batch.endpoint),
    h("td", { title: new Date(batch.created_at * 1000).toISOString() }, age(batch.created_at)),
    h("td", { class: "num" }, rate === null ? "–" : `${number(rate, 1)} lines/s`),
  );
}

export function mount(main) {
  const status = h("p", { class: "muted", id: "batches-status" }, "Loading…");
  const body = h("tbody");
  const table = h(
    "table",
    { id: "batches" },
    h("thead", {}, h("tr", {}, ["Batch", "Status", "Progress", "Lines", "Model", "Endpoint", "Age", "Throughput"].map((t) => h("th", {}, t)))),
    body,
  );
  replace(main, h("h1", {}, "Batches"), status, h("div", { class: "table-wrap" }, table));
  return poll(async () => {
    const page = await json(`/v1/batches?limit=${LIMIT}`);
    replace(body, page.data.map(row));
    replace(
      status,
      page.data.length === 0
        ? "No batches yet. Create one with POST /v1/batches (see API docs)."
        : `${page.data.length} batch${page.data.length === 1 ? "" : "es"}${page.has_more ? ` (the latest ${LIMIT})` : ""}, updated ${new Date().toLocaleTimeString()}`,
    );
  });
}
