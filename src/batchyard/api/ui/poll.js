// Repeat a refresh every `interval` ms while the tab is visible; stop() ends it (when the page changes). A failed
// refresh shows its message in the banner; the next good one clears it.

import { banner } from "./dom.js";

export function poll(refresh, interval = 2000) {
  let timer = null;
  let stopped = false;
  let running = false;

  const schedule = () => {
    if (!stopped && timer === null && !document.hidden) timer = setTimeout(tick, interval);
  };
  async function tick() {
    timer = null;
    if (stopped || document.hidden || running) return;
    running = true;
    try {
      const more = await refresh();
      banner(null);
      if (more === false) stopped = true;
    } catch (error) {
      banner(error.status === 401 ? null : error.message);
    } finally {
      running = false;
    }
    schedule();
  }
  const onVisibility = () => {
    clearTimeout(timer);
    timer = null;
    if (!document.hidden) tick();
  };
  document.addEventListener("visibilitychange", onVisibility);
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisibility);
  };
}
