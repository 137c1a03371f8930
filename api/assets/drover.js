// Drover's dashboard: follows a run's events live (SSE) and reloads the
// page when the run ends. The pages work without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const list of document.querySelectorAll("ol[data-events]")) {
    const url = `${list.dataset.events}?after=${encodeURIComponent(list.dataset.after || "0")}`;
    const source = new EventSource(url);
    source.addEventListener("event", (m) => {
      const e = JSON.parse(m.data);
      const li = document.createElement("li");
      li.className = e.level;
      const at = document.createElement("time");
      at.textContent = e.at;
      const step = document.createElement("span");
      step.className = "step";
      step.textContent = e.step;
      const msg = document.createElement("span");
      msg.className = "msg";
      msg.textContent = e.message;
      li.append(at, " ", step, " ", msg);
      list.append(li);
    });
    source.addEventListener("end", (m) => {
      source.close();
      const status = document.getElementById("status");
      if (status) {
        status.textContent = m.data;
      }
      // The whole page again: final status, timings, error.
      window.location.reload();
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        const following = document.getElementById("following");
        if (following) {
          following.textContent = "Lost the live stream; reload to see where it is.";
        }
      }
    });
  }
});
