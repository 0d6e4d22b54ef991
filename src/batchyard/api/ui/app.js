// The dashboard's shell: the API key (asked once, kept in sessionStorage), sign-out, and the pages by URL hash.

import { ApiError, json, onUnauthorized, session } from "./api.js";
import * as batch from "./batch.js";
import * as batches from "./batches.js";
import { banner, h, replace } from "./dom.js";
import * as files from "./files.js";
import * as upstreams from "./upstreams.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOut = document.getElementById("sign-out");
let stop = () => {};
let signedIn = false;

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, ...rest] = hash.split("/");
  if (page === "batches" && rest.length > 0 && rest[0]) return ["batches", decodeURIComponent(rest.join("/"))];
  if (page === "files" || page === "upstreams") return [page, null];
  return ["batches", null];
}

function show() {
  stop();
  banner(null);
  const [page, id] = route();
  for (const a of nav.querySelectorAll("a[data-page]")) a.classList.toggle("active", a.dataset.page === page);
  if (page === "batches" && id) stop = batch.mount(main, id);
  else if (page === "files") stop = files.mount(main);
  else if (page === "upstreams") stop = upstreams.mount(main);
  else stop = batches.mount(main);
  document.title = `batchyard · ${id ?? page}`;
}

function askForKey(message) {
  stop();
  stop = () => {};
  signedIn = false;
  nav.hidden = true;
  signOut.hidden = true;
  who.textContent = "";
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", spellcheck: "false", required: true, placeholder: "sk-…", "aria-label": "API key" });
  const error = h("p", { id: "key-error", class: "error", role: "alert", hidden: !message }, message ?? "");
  const form = h(
    "form",
    { id: "key-form", class: "card" },
    h("h1", {}, "Sign in"),
    h("p", {}, "This server needs an API key. It is kept in this browser tab only (sessionStorage) and sent as an Authorization header."),
    h("label", { for: "api-key" }, "API key"),
    input,
    error,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    session.set(input.value.trim());
    start();
  });
  replace(main, form);
  input.focus();
}

function rejected(error) {
  return error.code === "invalid_api_key" || session.key
    ? `That API key was not accepted (401: ${error.message})`
    : null;
}

async function start() {
  try {
    await json("/v1/batches?limit=1");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      const message = session.key ? rejected(error) : null;
      session.clear();
      askForKey(message);
      return;
    }
    replace(main, h("p", { class: "error", role: "alert" }, `The server did not answer: ${error.message}`));
    return;
  }
  signedIn = true;
  nav.hidden = false;
  signOut.hidden = !session.key;
  who.textContent = session.key ? "signed in with an API key" : "open server (no API key needed)";
  show();
}

onUnauthorized((error) => {
  if (!signedIn) return;
  const message = rejected(error);
  session.clear();
  askForKey(message);
});

signOut.addEventListener("click", () => {
  session.clear();
  askForKey(null);
});

window.addEventListener("hashchange", () => {
  if (signedIn) show();
});

start();
