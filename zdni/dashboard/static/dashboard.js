// The zdni dashboard page: polls the JSON API (zdni/dashboard/app.py) and redraws in place.
// Stages every second, metric records incrementally (?since=the last id seen), events, and the
// run list every few seconds. Curves are the report's (zdni/plots.py): train and test loss,
// test and train accuracy, samples/s, and every per-stage field of the iter records (M's and
// I's losses, lag, staleness, and any a newer zdni adds), one line per stage.
"use strict";

const POLL_MS = 1000;
const RUNS_MS = 5000;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
const STAGE_FIELDS = {  // per-stage fields of iter records: title, log scale
  grad_loss: ["M: synthetic gradient loss (MSE to the true gradient)", true],
  input_loss: ["I: synthetic input loss (MSE to the true input)", true],
  lag: ["Lag: batches fed, not yet trained by the stage", false],
  staleness: ["Staleness: iterations a stage moved on before its true gradient came", false],
};

const $ = (sel) => document.querySelector(sel);
let run = null;        // the run shown
let since = "0";       // the last metric record id taken
let eventsSince = "0";
let generation = 0;    // bumps when the run changes: answers for the old one are dropped
let charts = {};       // name -> {plot, series: Map(label -> Map(x -> y)), key}

async function get(path) {
  const answer = await fetch(path, {cache: "no-store"});
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.error || answer.statusText);
  return body;
}

function text(v, digits = 0) {
  return v === null || v === undefined ? "–" : (typeof v === "number" ? v.toFixed(digits) : v);
}

// What Redis holds goes into the page as text, never as markup.
function cell(content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content);
  else td.textContent = String(content);
  return td;
}

function badge(state) {
  const span = document.createElement("span");
  span.className = "state " + String(state).replace(/[^a-z]/g, "");
  span.textContent = state;
  return span;
}

// -- runs -------------------------------------------------------------------------------------
async function pollRuns() {
  const found = await get("api/runs");
  $("#actions-off").hidden = found.actions;
  const body = $("#runs tbody");
  body.replaceChildren(...found.runs.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.run = r.run;
    tr.className = r.run === run ? "selected" : "";
    const name = r.label || `${r.model} ${r.mode}${r.conditioned ? " cDNI" : ""}`;
    tr.title = `${r.run}: ${name}`;
    tr.append(cell(r.run), cell(badge(r.status)),
      cell(r.test_accuracy === null ? "–" : (100 * r.test_accuracy).toFixed(2)));
    tr.onclick = () => select(r.run);
    return tr;
  }));
  const wanted = decodeURIComponent(location.hash.replace(/^#run=/, "")) || found.default;
  if (!run && wanted) select(wanted);
}

function select(id) {
  run = id;
  since = eventsSince = "0";
  recent = [];
  generation += 1;
  location.hash = "run=" + encodeURIComponent(id);
  for (const c of Object.values(charts)) c.plot.destroy();
  charts = {};
  $("#charts").replaceChildren();
  $("#events").replaceChildren();
  for (const tr of document.querySelectorAll("#runs tbody tr"))
    tr.className = tr.dataset.run === id ? "selected" : "";
  get(`api/runs/${encodeURIComponent(id)}`).then((info) => {
    const s = info.state;
    $("#run-title").textContent = `${id}${info.config.label ? " — " + info.config.label : ""}`;
    $("#config").textContent = JSON.stringify(info.config, null, 1);
    $("#run-line").textContent = `${info.config.model} on ${info.config.dataset}, ` +
      `${info.config.mode}${info.config.conditioned ? " cDNI" : ""}, ${s.stages} stages, ` +
      `batch ${info.config.batch_size}`;
  }).catch(showError);
}

// -- stages -----------------------------------------------------------------------------------
function stageRow(st) {
  const m = st.metrics || {};
  const gpu = st.gpu_util_percent === undefined ? "–" : `${st.gpu_util_percent.toFixed(0)} %`;
  const gmem = st.gpu_mem_used_mb !== undefined
    ? `${(st.gpu_mem_used_mb / 1024).toFixed(1)} / ${(st.gpu_mem_total_mb / 1024).toFixed(0)} GiB`
    : (st.gpu_mem_mb !== undefined ? `${st.gpu_mem_mb.toFixed(0)} MiB` : "–");
  const disk = st.disk_used_percent === undefined ? "–"
    : `${st.disk_used_percent.toFixed(0)} % (${text(st.disk_free_gb, 1)} GiB free)`;
  const cells = [st.stage, badge(st.state), st.iteration,
    st.heartbeat_age_s === null ? "–" : `${st.heartbeat_age_s.toFixed(1)} s`, text(m.lag),
    text(m.staleness, 1), text(st.cpu_percent), st.rss_mb === undefined ? "–"
      : `${st.rss_mb.toFixed(0)} MiB`, disk, gpu, gmem, st.trained, st.dropped,
    `${st.host || "–"} / ${st.pid || "–"}`];
  const tr = document.createElement("tr");
  tr.dataset.stage = st.stage;
  tr.dataset.state = st.state;
  tr.append(...cells.map(cell));
  if (st.disk_path) tr.children[8].title = st.disk_path;
  if (st.gpu_name) tr.children[9].title = st.gpu_name;
  return tr;
}

async function pollStages(gen) {
  const got = await get(`api/runs/${encodeURIComponent(run)}/stages`);
  if (gen !== generation) return;
  $("#stages tbody").replaceChildren(...got.stages.map(stageRow));
  $("#run-line").dataset.status = got.status;
  const title = $("#run-title");
  title.dataset.status = got.status;
  title.className = `state ${got.status}`;
}

// -- curves -----------------------------------------------------------------------------------
function tickText(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(0);
  return String(Number(v.toPrecision(3)));
}

let recent = [];  // (wall_s, samples) of the last iter records: samples/s over >= RATE_S
const RATE_S = 2.0;  // per-record rates of the first 200 iterations are milliseconds apart

function rate(r) {
  recent.push([r.wall_s, r.samples]);
  while (recent.length > 2 && recent[1][0] <= r.wall_s - RATE_S) recent.shift();
  const [w0, s0] = recent[0];
  return r.wall_s - w0 >= RATE_S / 2 ? (r.samples - s0) / (r.wall_s - w0) : null;
}

function put(name, title, log, label, x, y) {
  if (y === null || y === undefined || !Number.isFinite(y) || (log && y <= 0)) return;
  const c = charts[name] || (charts[name] = {title, log, series: new Map(), plot: null, key: ""});
  if (!c.series.has(label)) c.series.set(label, new Map());
  c.series.get(label).set(x, y);
}

function take(records) {
  for (const r of records) {
    const x = r.kind === "epoch" ? r.iterations : r.iteration;
    if (x === undefined) continue;
    if (r.kind === "iter") {
      put("loss", "Loss (cross-entropy, nats; log scale)", true, "train loss", x, r.train_loss);
      put("accuracy", "Accuracy (%)", false, "train accuracy", x,
        r.train_accuracy === null || r.train_accuracy === undefined ? null : 100 * r.train_accuracy);
      put("speed", `Samples per second (over ${RATE_S} s)`, false, "samples/s", x, rate(r));
      for (const [field, perStage] of Object.entries(r)) {
        if (perStage === null || typeof perStage !== "object") continue;
        const [title, log] = STAGE_FIELDS[field] || [field.replace(/_/g, " ") + " per stage", false];
        for (const [stage, v] of Object.entries(perStage))
          put(field, title, log, `stage ${stage}`, x, v);
      }
    } else if (r.kind === "eval" || r.kind === "epoch") {
      put("loss", "Loss (cross-entropy, nats; log scale)", true, "test loss", x, r.test_loss);
      put("accuracy", "Accuracy (%)", false, "test accuracy", x, 100 * r.test_accuracy);
    }
  }
}

function draw() {
  const order = ["loss", "accuracy", "speed", "grad_loss", "input_loss", "lag", "staleness"];
  const names = Object.keys(charts).sort((a, b) =>
    (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99) || a.localeCompare(b));
  for (const name of names) {
    const c = charts[name];
    const labels = [...c.series.keys()].sort();
    const xs = [...new Set(labels.flatMap((l) => [...c.series.get(l).keys()]))]
      .sort((a, b) => a - b);
    const data = [xs, ...labels.map((l) => xs.map((x) => c.series.get(l).get(x) ?? null))];
    let box = document.getElementById("chart-" + name);
    if (!box) {
      box = document.createElement("div");
      box.className = "chart";
      box.id = "chart-" + name;
      const title = document.createElement("div");
      title.className = "title";
      title.textContent = c.title;
      box.append(title);
      $("#charts").append(box);
    }
    box.dataset.points = String(c.series.get(labels[0]).size);
    const key = labels.join("|");
    if (c.plot && c.key === key) {
      c.plot.setData(data);
      continue;
    }
    if (c.plot) c.plot.destroy();
    c.key = key;
    c.plot = new uPlot({
      width: Math.max(box.clientWidth - 8, 300), height: 220,
      scales: {x: {time: false}, y: {distr: c.log ? 3 : 1}},
      axes: [{label: "iteration"}, {size: 60, values: (u, ticks) => ticks.map(tickText)}],
      legend: {live: false},  // below the plot: it never covers the curves
      series: [{label: "iteration"}, ...labels.map((l, i) => ({
        label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
        points: {show: c.series.get(l).size < 30}}))],
    }, data, box);
  }
}

async function pollMetrics(gen) {
  for (let pages = 0; pages < 20; pages++) {
    const got = await get(`api/runs/${encodeURIComponent(run)}/metrics?since=${since}`);
    if (gen !== generation) return;
    take(got.records);
    since = got.last;
    if (!got.more) break;
  }
  draw();
}

async function pollEvents(gen) {
  const got = await get(`api/runs/${encodeURIComponent(run)}/events?since=${eventsSince}`);
  if (gen !== generation) return;
  eventsSince = got.last;
  for (const e of got.events) {
    const li = document.createElement("li");
    const when = new Date(1000 * e.time).toLocaleTimeString();
    li.textContent = e.stage !== undefined ? `${when} stage ${e.stage} ${e.state}`
      : `${when} ${e.event}${e.to !== undefined ? " " + e.to : ""}`;
    if (e.state === "failed") li.className = "failed";
    $("#events").prepend(li);
  }
}

async function pollBackups(gen) {
  const got = await get(`api/runs/${encodeURIComponent(run)}/backups`);
  if (gen !== generation) return;
  const select = $("#rollback-to");
  const before = select.value;
  select.replaceChildren(...got.common.slice().reverse().map((it) => new Option(it, it)));
  if ([...select.options].some((o) => o.value === before)) select.value = before;
}

// -- operator ---------------------------------------------------------------------------------
async function act(path, body) {
  const token = $("#token").value;
  sessionStorage.setItem("zdni-token", token);
  $("#action-result").textContent = "…";
  try {
    const answer = await fetch(`api/runs/${encodeURIComponent(run)}/${path}`, {
      method: "POST", headers: {"Authorization": "Bearer " + token,
        "Content-Type": "application/json"}, body: JSON.stringify(body || {})});
    const got = await answer.json();
    $("#action-result").textContent = answer.ok ? JSON.stringify(got) : `${answer.status}: ${got.error}`;
  } catch (err) {
    showError(err);
  }
}

function showError(err) {
  $("#conn").textContent = "error: " + err.message;
  $("#conn").className = "failed";
}

let ticks = 0;
async function tick() {
  // The run list and backups every RUNS_MS, the run's stages, curves and events every POLL_MS.
  const gen = generation;
  try {
    if (ticks++ % Math.round(RUNS_MS / POLL_MS) === 0) {
      await pollRuns();
      if (run) await pollBackups(generation);
    }
    if (run) await Promise.all([pollStages(gen), pollMetrics(gen), pollEvents(gen)]);
    $("#conn").textContent = "updated " + new Date().toLocaleTimeString();
    $("#conn").className = "muted";
  } catch (err) {
    showError(err);
  }
  setTimeout(tick, POLL_MS);
}

$("#token").value = sessionStorage.getItem("zdni-token") || "";
$("#rollback").onclick = () => act("rollback", {to: Number($("#rollback-to").value)});
$("#stop").onclick = () => { if (confirm(`Stop run ${run}?`)) act("stop"); };
window.addEventListener("resize", () => {
  for (const [name, c] of Object.entries(charts)) {
    const box = document.getElementById("chart-" + name);
    if (c.plot && box) c.plot.setSize({width: Math.max(box.clientWidth - 8, 300), height: 220});
  }
});
tick();
