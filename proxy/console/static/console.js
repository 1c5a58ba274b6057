// completions-proxy console: keyboard moves, copy buttons, local times, confirmations.
// Loaded from /ui/static (the page's CSP allows no inline script); nothing here builds
// markup from data: text goes in through textContent only.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Times: shown in UTC by the server, in the reader's own zone here.
  for (const node of document.querySelectorAll("time[datetime]")) {
    const when = new Date(node.getAttribute("datetime"));
    if (!Number.isNaN(when.getTime())) {
      node.title = node.textContent + " UTC";
      const pad = (n) => String(n).padStart(2, "0");
      node.textContent = `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ` +
        `${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}`;
    }
  }

  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      try {
        await navigator.clipboard.writeText(source.textContent);
        button.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = "Selected";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  }

  for (const form of document.querySelectorAll("form.confirm[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  // Keyboard: / search, j/k move through rows, Enter or o opens, h/l newer/older page.
  const rows = Array.from(document.querySelectorAll("table[data-rows] tbody tr"));
  let current = -1;
  const select = (index) => {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, index));
    rows.forEach((row, i) => row.classList.toggle("current", i === current));
    const link = rows[current].querySelector("a.rowlink");
    if (link) link.focus({ preventScroll: true });
    rows[current].scrollIntoView({ block: "nearest" });
  };
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target instanceof HTMLElement &&
      (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
    if (event.key === "Escape" && typing) { target.blur(); return; }
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "/") {
      const search = document.getElementById("q");
      if (search) { event.preventDefault(); search.focus(); search.select(); }
    } else if (event.key === "j") {
      select(current + 1);
    } else if (event.key === "k") {
      select(current - 1);
    } else if (event.key === "o" && current >= 0) {
      const link = rows[current].querySelector("a.rowlink");
      if (link) link.click();
    } else if (event.key === "h" || event.key === "l") {
      const link = document.querySelector(`.pager a[data-key="${event.key}"]`);
      if (link) link.click();
    }
  });
});
