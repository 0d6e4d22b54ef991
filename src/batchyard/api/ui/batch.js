// One batch: every field, errors.data, the error file grouped by code, usage, timings, downloads, cancel.

import { download, json, readCapped } from "./api.js";
import { bytes, duration, h, number, replace, statusBadge, when } from "./dom.js";
import { groupErrors, READ_CAP } from "./errorfile.js";
import { poll } from "./poll.js";
import { progressBar, progressOf, throughput } from "./batches.js";

const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const CANCELLABLE = new Set(["validating", "in_progress"]);
const STEPS = [
  ["created", "created_at"],
  ["in progress", "in_progress_at"],
  ["finalizing", "finalizing_at"],
  ["completed", "completed_at"],
  ["failed", "failed_at"],
  ["cancelling", "cancelling_at"],
  ["cancelled", "cancelled_at"],
  ["expired", "expired_at"],
];

function kv(rows) {
  return h("table", { class: "kv" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

function fileButton(label, fileId, id) {
  if (!fileId) return null;
  return h("button", { type: "button", id, onclick: () => download(fileId).catch((e) => alert(e.message)) }, label);
}

function timings(batch) {
  const seen = STEPS.filter(([, key]) => batch[key]).sort((a, b) => batch[a[1]] - batch[b[1]]);
  return h(
    "ol",
    { class: "timeline", id: "timings" },
    seen.map(([label, key], i) =>
      h(
        "li",
        {},
        h("span", { class: "step" }, label),
        h("span", {}, when(batch[key])),
        i > 0 ? h("span", { class: "muted" }, `+${duration(batch[key] - batch[seen[i - 1][1]])}`) : null,
      ),
    ),
  );
}

function usage(batch) {
  const u = batch.usage ?? {};
  return kv([
    ["input tokens", number(u.input_tokens)],
    ["cached input tokens", number(u.input_tokens_details?.cached_tokens)],
    ["output tokens", number(u.output_tokens)],
    ["reasoning tokens", number(u.output_tokens_details?.reasoning_tokens)],
    ["total tokens", number(u.total_tokens)],
  ]);
}

function metadata(batch) {
  const m = batch.metadata;
  if (!m || Object.keys(m).length === 0) return h("span", { class: "muted" }, "none");
  return h("dl", { class: "metadata" }, Object.entries(m).map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}

function validationErrors(batch) {
  const data = batch.errors?.data ?? [];
  if (data.length === 0) return null;
  return h(
    "section",
    {},
    h("h2", {}, `Validation errors (${data.length})`),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "validation-errors" },
        h("thead", {}, h("tr", {}, ["Line", "Code", "Param", "Message"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          data.map((e) =>
            h("tr", {}, h("td", { class: "num" }, e.line ?? "–"), h("td", { class: "mono" }, e.code ?? ""), h("td", { class: "mono" }, e.param ?? ""), h("td", {}, e.message ?? "")),
          ),
        ),
      ),
    ),
  );
}

async function errorGroups(fileId, target) {
  replace(target, h("p", { class: "muted" }, "Reading the error file…"));
  const { text, truncated } = await readCapped(fileId, READ_CAP);
  const { read, groups } = groupErrors(text, truncated);
  replace(
    target,
    h("p", { class: "muted" }, truncated ? `The first ${bytes(READ_CAP)} of the error file: ${number(read)} lines read.` : `${number(read)} error lines.`),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "error-groups" },
        h("thead", {}, h("tr", {}, ["Error", "Lines", "Examples (line of the error file, custom_id, message)"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          groups.map((g) =>
            h(
              "tr",
              { "data-group": g.key },
              h("td", { class: "mono" }, g.key),
              h("td", { class: "num" }, number(g.count)),
              h("td", {}, h("ul", { class: "examples" }, g.examples.map((x) => h("li", {}, h("span", { class: "muted" }, `#${x.lineNumber} `), h("code", {}, x.customId), " ", x.message)))),
            ),
          ),
        ),
      ),
    ),
  );
}

export function mount(main, batchId) {
  const head = h("div", { class: "title-row" });
  const body = h("div");
  const groups = h("div", { id: "error-groups-section" });
  let groupedFile = null;
  replace(main, h("p", {}, h("a", { href: "#/batches" }, "← Batches")), head, body, h("section", {}, h("h2", {}, "Error lines by code"), groups));

  async function cancel() {
    if (!confirm(`Cancel batch ${batchId}? Lines not yet sent will end as batch_cancelled errors.`)) return;
    await json(`/v1/batches/${encodeURIComponent(batchId)}/cancel`, { method: "POST" });
    await refresh();
  }

  async function refresh() {
    const batch = await json(`/v1/batches/${encodeURIComponent(batchId)}`);
    const { done, total } = progressOf(batch);
    const rate = throughput(batch);
    replace(
      head,
      h("h1", { class: "mono" }, batch.id),
      statusBadge(batch.status),
      CANCELLABLE.has(batch.status) ? h("button", { type: "button", id: "cancel", class: "danger", onclick: () => cancel().catch((e) => alert(e.message)) }, "Cancel batch") : null,
    );
    replace(
      body,
      h("div", { class: "grid" }, [
        h(
          "section",
          {},
          h("h2", {}, "Batch"),
          kv([
            ["status", statusBadge(batch.status)],
            ["progress", progressBar(batch)],
            ["lines", `${number(batch.request_counts?.completed)} completed · ${number(batch.request_counts?.failed)} failed · ${number(total)} total (${number(done)} done)`],
            ["throughput", rate === null ? "–" : `${number(rate, 1)} lines/s`],
            ["endpoint", h("span", { class: "mono" }, batch.endpoint)],
            ["model", batch.model ?? "–"],
            ["completion window", batch.completion_window],
            ["input file", h("span", { class: "mono" }, batch.input_file_id)],
            ["output file", h("span", { class: "mono" }, batch.output_file_id ?? "–")],
            ["error file", h("span", { class: "mono" }, batch.error_file_id ?? "–")],
            ["expires", when(batch.expires_at)],
            ["metadata", metadata(batch)],
          ]),
          h(
            "div",
            { class: "buttons" },
            fileButton("Download output", batch.output_file_id, "download-output"),
            fileButton("Download errors", batch.error_file_id, "download-errors"),
            fileButton("Download input", batch.input_file_id, "download-input"),
          ),
        ),
        h("section", {}, h("h2", {}, "Timings"), timings(batch), h("h2", {}, "Usage"), usage(batch)),
      ]),
      validationErrors(batch),
    );
    if (batch.error_file_id && batch.error_file_id !== groupedFile) {
      groupedFile = batch.error_file_id;
      await errorGroups(batch.error_file_id, groups);
    } else if (!batch.error_file_id) {
      replace(groups, h("p", { class: "muted" }, TERMINAL.has(batch.status) ? "No error file: no line failed." : "The error file is written when the batch finishes."));
    }
    return !TERMINAL.has(batch.status);
  }

  return poll(refresh);
}
