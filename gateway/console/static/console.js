// The console's only script: the confirmation dialog in front of every action, and the live refresh of each
// page's figures. Without it every page still works: actions ask for their reason and confirmation on a page of
// their own, and a reload shows the figures.
"use strict";
(function () {
  const body = document.body;
  const live = document.getElementById("live");
  const dialog = document.getElementById("confirm-dialog");
  let pending = null;

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("action")) return;
    if (!dialog || typeof dialog.showModal !== "function") return; // the server asks instead
    event.preventDefault();
    pending = form;
    const button = form.querySelector("button[type=submit]");
    document.getElementById("confirm-text").textContent = form.dataset.confirm || "";
    document.getElementById("confirm-ok").textContent = button ? button.textContent : "Confirm";
    const reason = document.getElementById("confirm-reason");
    reason.value = "";
    dialog.showModal();
    reason.focus();
  });

  if (dialog) {
    dialog.addEventListener("close", function () {
      const form = pending;
      pending = null;
      const reason = document.getElementById("confirm-reason").value.trim();
      if (!form || dialog.returnValue !== "confirm" || !reason) return;
      // A copy outside the live region: a refresh may have replaced the form that was clicked.
      const copy = form.cloneNode(true);
      copy.hidden = true;
      copy.elements.namedItem("reason").value = reason;
      copy.elements.namedItem("confirm").value = "yes";
      document.body.appendChild(copy);
      copy.submit();
    });
  }

  const period = parseInt(body.dataset.refresh || "0", 10);
  if (!live || !(period > 0)) return;
  let busy = false;

  function replace(html) {
    const focused = live.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
    const open = Array.from(live.querySelectorAll("details[open][data-key]"), (d) => d.dataset.key);
    live.innerHTML = html;
    for (const key of open) {
      const d = live.querySelector('details[data-key="' + CSS.escape(key) + '"]');
      if (d) d.open = true;
    }
    if (focused) {
      const again = live.querySelector('[aria-label="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
    body.dataset.updated = String(Date.now());
  }

  async function refresh() {
    if (busy || document.hidden || (dialog && dialog.open)) return;
    busy = true;
    try {
      const r = await fetch(location.href, {
        headers: { "X-Console-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (r.redirected) {
        location.assign(r.url); // signed out, or the session expired
      } else if (r.ok) {
        replace(await r.text());
      }
    } catch (err) {
      // The gateway may be restarting: the next tick tries again.
    } finally {
      busy = false;
    }
  }

  setInterval(refresh, period);
})();
