// xobackup web overview: expand runs, filter, run now, live updates. Plain JS, no build step.
"use strict";

const expanded = new Set();
let refreshing = null;
let again = false;

function $(selector, root = document) { return root.querySelector(selector); }
function $all(selector, root = document) { return Array.from(root.querySelectorAll(selector)); }

async function fetchText(url) {
  const response = await fetch(url, { headers: { "Accept": "text/html" }, credentials: "same-origin" });
  if (response.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname); }
  if (!response.ok) { throw new Error(url + ": HTTP " + response.status); }
  return response.text();
}

function toast(text, kind) {
  let box = $("#toast");
  if (!box) {
    box = document.createElement("div");
    box.id = "toast";
    box.setAttribute("role", "status");
    document.body.appendChild(box);
  }
  box.textContent = text;
  box.className = "toast " + (kind || "");
  clearTimeout(box.timer);
  box.timer = setTimeout(() => { box.className = "toast hidden"; }, 5000);
}

// Keep which task entries were open when a tree is redrawn.
function openStates(root) {
  const states = new Map();
  $all("li.task", root).forEach((li) => {
    const details = li.querySelector(":scope > details");
    if (details) { states.set(li.dataset.taskId, details.open); }
  });
  return states;
}

function restoreStates(root, states) {
  $all("li.task", root).forEach((li) => {
    const details = li.querySelector(":scope > details");
    if (details && states.has(li.dataset.taskId)) { details.open = states.get(li.dataset.taskId); }
  });
}

async function loadTree(body, runId) {
  const html = await fetchText("/fragments/runs/" + encodeURIComponent(runId));
  const states = openStates(body);
  body.innerHTML = html;
  restoreStates(body, states);
}

function detailRow(runId) {
  return $(`tr.run-detail[data-run-id="${CSS.escape(runId)}"]`);
}

async function toggleRun(button) {
  const row = button.closest("tr.run");
  const runId = row.dataset.runId;
  const detail = detailRow(runId);
  const open = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(open));
  detail.hidden = !open;
  if (open) {
    expanded.add(runId);
    await loadTree($(".detail-body", detail), runId);
  } else {
    expanded.delete(runId);
  }
}

function filterQuery() {
  const form = $("#filters");
  if (!form) { return ""; }
  const params = new URLSearchParams();
  new FormData(form).forEach((value, key) => { if (value) { params.set(key, value); } });
  return params.toString();
}

async function refreshRuns() {
  const body = $("#runs-body");
  if (!body) { return; }
  const query = filterQuery();
  const html = await fetchText("/fragments/runs" + (query ? "?" + query : ""));
  const oldTrees = new Map();
  expanded.forEach((runId) => {
    const detail = detailRow(runId);
    if (detail) { oldTrees.set(runId, $(".detail-body", detail)); }
  });
  body.innerHTML = html;
  const loads = [];
  expanded.forEach((runId) => {
    const detail = detailRow(runId);
    if (!detail) { return; }  // filtered out: forget it
    const button = $(`tr.run[data-run-id="${CSS.escape(runId)}"] button.expand`);
    button.setAttribute("aria-expanded", "true");
    detail.hidden = false;
    const target = $(".detail-body", detail);
    const old = oldTrees.get(runId);
    if (old) { target.replaceWith(old); }
    loads.push(loadTree(old || target, runId));
  });
  await Promise.all(loads);
}

async function refreshJobs() {
  const body = $("#jobs-body");
  if (!body) { return; }
  body.innerHTML = await fetchText("/fragments/jobs");
}

async function refreshStandalone() {
  const body = $(".detail-body.standalone");
  if (body) { await loadTree(body, body.dataset.runId); }
}

// One refresh at a time; a change seen meanwhile triggers exactly one more.
function refreshAll() {
  if (refreshing) { again = true; return refreshing; }
  refreshing = Promise.all([refreshJobs(), refreshRuns(), refreshStandalone()])
    .catch((error) => console.warn(error))
    .finally(() => {
      refreshing = null;
      if (again) { again = false; refreshAll(); }
    });
  return refreshing;
}

async function runNow(button) {
  const job = button.dataset.job;
  button.disabled = true;
  button.textContent = "Starting…";
  try {
    const response = await fetch("/api/jobs/" + encodeURIComponent(job) + "/run", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Requested-With": "xobackup" },
      body: "{}",
    });
    const answer = await response.json();
    if (response.status === 202) {
      toast(`Run ${answer.runId.slice(0, 8)} of ${job} started`, "ok");
      expanded.add(answer.runId);
    } else {
      toast(answer.detail || ("HTTP " + response.status), "bad");
    }
  } catch (error) {
    toast(String(error), "bad");
  }
  await refreshAll();
}

function connectEvents() {
  const live = $("#live");
  if (!window.EventSource || !($("#runs-body") || $(".detail-body.standalone"))) {
    if (live) { live.hidden = true; }
    return;
  }
  const source = new EventSource("/api/events");
  let first = true;
  source.addEventListener("change", () => {
    if (first) { first = false; return; }  // the page was drawn with this state already
    refreshAll();
  });
  source.onopen = () => { live.classList.add("on"); live.title = "live updates on"; };
  source.onerror = () => { live.classList.remove("on"); live.title = "reconnecting…"; };
}

document.addEventListener("click", (event) => {
  const expand = event.target.closest("button.expand");
  if (expand) { event.preventDefault(); toggleRun(expand); return; }
  const run = event.target.closest("button.run-now");
  if (run) { event.preventDefault(); runNow(run); }
});

document.addEventListener("DOMContentLoaded", () => {
  const form = $("#filters");
  if (form) {
    let timer = null;
    const apply = () => {
      const query = filterQuery();
      history.replaceState(null, "", query ? "/?" + query : "/");
      refreshRuns().catch((error) => console.warn(error));
    };
    form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
    form.addEventListener("change", apply);
    form.addEventListener("input", (event) => {
      if (event.target.tagName === "INPUT") { clearTimeout(timer); timer = setTimeout(apply, 300); }
    });
  }
  connectEvents();
});
