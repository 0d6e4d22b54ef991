// The files list: purpose, size, created; download and delete.

import { download, json, request } from "./api.js";
import { age, banner, bytes, h, replace, when } from "./dom.js";

function row(file, reload) {
  const remove = async () => {
    if (!confirm(`Delete file ${file.id} (${file.filename})? This cannot be undone.`)) return;
    await request(`/v1/files/${encodeURIComponent(file.id)}`, { method: "DELETE" });
    await reload();
  };
  const failed = (e) => banner(e.message);
  return h(
    "tr",
    { "data-file-id": file.id },
    h("td", { class: "mono" }, file.id),
    h("td", { class: "filename" }, file.filename),
    h("td", {}, file.purpose),
    h("td", { class: "num", title: `${file.bytes} bytes` }, bytes(file.bytes)),
    h("td", { title: when(file.created_at) }, age(file.created_at)),
    h("td", {}, file.expires_at ? when(file.expires_at) : "never"),
    h(
      "td",
      { class: "buttons" },
      h("button", { type: "button", class: "download", onclick: () => download(file.id).catch(failed) }, "Download"),
      h("button", { type: "button", class: "danger delete", onclick: () => remove().catch(failed) }, "Delete"),
    ),
  );
}

export function mount(main) {
  const status = h("p", { class: "muted", id: "files-status" }, "Loading…");
  const body = h("tbody");
  const table = h(
    "table",
    { id: "files" },
    h("thead", {}, h("tr", {}, ["File", "Name", "Purpose", "Size", "Created", "Expires", ""].map((t) => h("th", {}, t)))),
    body,
  );
  replace(main, h("h1", {}, "Files"), status, h("div", { class: "table-wrap" }, table));
  let alive = true;
  async function reload() {
    const page = await json("/v1/files?limit=1000&order=desc");
    if (!alive) return;
    replace(body, page.data.map((f) => row(f, reload)));
    replace(status, page.data.length === 0 ? "No files." : `${page.data.length} file${page.data.length === 1 ? "" : "s"}${page.has_more ? " (the latest 1000)" : ""}`);
  }
  reload().catch((e) => banner(e.message));
  return () => {
    alive = false;
  };
}
