// backprop ui: live run view (server-sent events), SVG charts, export and chat. No dependencies.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf"]').content;

async function post(url, body) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: JSON.stringify(body || {}),
  });
  return res.json();
}

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Draws line series [{points: [[x, y]], cls, right}] into an SVG: left axis for the first, right for `right` ones.
function drawChart(svg, series) {
  const W = 640, H = 260, L = 56, R = 56, T = 10, B = 28;
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(series.length ? series[0].points.length : 0);
  if (!all.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, class: "axis" }, "waiting for the first step"));
    return;
  }
  const xs = all.map((p) => p[0]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const range = (ps) => {
    const ys = ps.map((p) => p[1]);
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (hi === lo) { hi += Math.abs(hi) * 0.05 || 1; lo -= Math.abs(lo) * 0.05 || 1; }
    return [lo, hi];
  };
  const left = range(series.filter((s) => !s.right).flatMap((s) => s.points));
  const rightPts = series.filter((s) => s.right).flatMap((s) => s.points);
  const right = rightPts.length ? range(rightPts) : left;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y, [lo, hi]) => T + (1 - (y - lo) / (hi - lo)) * (H - T - B);
  svg.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "grid" }));
  for (const [v, y] of [[left[1], T], [left[0], H - B]]) svg.append(el("text", { x: L - 4, y: y + 4, class: "axis end" }, v.toPrecision(3)));
  if (rightPts.length) for (const [v, y] of [[right[1], T], [right[0], H - B]]) svg.append(el("text", { x: W - R + 4, y: y + 4, class: "axis start" }, v.toExponential(1)));
  svg.append(el("text", { x: L, y: H - 8, class: "axis start" }, `step ${x0}`));
  svg.append(el("text", { x: W - R, y: H - 8, class: "axis end" }, `step ${x1}`));
  for (const s of series) {
    const r = s.right ? right : left;
    const pts = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1], r).toFixed(1)}`).join(" ");
    svg.append(el("polyline", { points: pts, class: `line ${s.cls}` }));
    for (const p of s.points) svg.append(el("circle", { cx: sx(p[0]), cy: sy(p[1], r), r: 2.5, class: `pt ${s.cls}` }));
  }
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 90 ? `${Math.round(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function watchRun(name) {
  const metrics = new Map();
  const chart = document.getElementById("chart");
  const log = document.getElementById("log");
  const redraw = () => {
    const steps = [...metrics.values()].sort((a, b) => a.step - b.step);
    drawChart(chart, [
      { points: steps.filter((m) => m.loss != null).map((m) => [m.step, m.loss]), cls: "loss" },
      { points: steps.filter((m) => m.lr != null).map((m) => [m.step, m.lr]), cls: "lr", right: true },
    ]);
  };
  redraw();
  const source = new EventSource(`/runs/${encodeURIComponent(name)}/events`);
  source.addEventListener("update", (event) => {
    const u = JSON.parse(event.data);
    for (const m of u.metrics) metrics.set(m.step, m); // a resumed run logs its steps again: keep one per step
    if (u.metrics.length) redraw();
    const s = u.status;
    document.getElementById("state").textContent = s.state;
    document.getElementById("step").textContent = s.total_steps ? `${s.step}/${s.total_steps}` : `${s.step}`;
    document.getElementById("loss").textContent = s.loss == null ? "-" : s.loss.toPrecision(4);
    document.getElementById("tps").textContent = s.tokens_per_s == null ? "-" : String(s.tokens_per_s);
    document.getElementById("eta").textContent = seconds(s.eta_s);
    if (s.run_id) document.getElementById("run-id").textContent = s.run_id;
    document.getElementById("gpu").textContent = u.gpus.length
      ? u.gpus.map((g) => `GPU${g.index}: ${g.memory_used_gib}/${g.memory_total_gib} GiB, ${g.temperature_c} °C`).join("; ")
      : "n/a (no GPU)";
    const err = document.getElementById("run-error");
    err.classList.toggle("hidden", !s.error);
    if (s.error) err.textContent = `[${s.error.code}]: ${s.error.message}`;
    const summary = document.getElementById("summary");
    if (s.summary) {
      summary.classList.remove("hidden");
      summary.textContent = `Finished: ${s.summary.steps} steps, final loss ${Number(s.summary.final_loss).toPrecision(4)}, ${s.summary.duration_s} s`;
    }
    for (const line of u.logs) log.textContent += `${line.time} ${line.level} ${line.message} run_id=${line.run_id || "-"}\n`;
    if (u.logs.length) log.scrollTop = log.scrollHeight;
    showExport(u.export);
  });
  document.getElementById("stop").addEventListener("click", () => post(`/runs/${name}/stop`));
  document.getElementById("resume").addEventListener("click", async () => {
    const r = await post(`/runs/${name}/resume`);
    if (!r.ok) alert(`[${r.error.code}]: ${r.error.message}`);
  });
  document.getElementById("export").addEventListener("click", async () => {
    const r = await post(`/runs/${name}/export`, {
      format: document.getElementById("format").value,
      quantization: document.getElementById("quantization").value,
      ollama: document.getElementById("ollama").checked,
    });
    if (!r.ok) showExport({ state: "failed", error: r.error, done: 0, total: 0 });
  });
  const history = [];
  document.getElementById("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    history.push({ role: "user", content: text });
    addChat("user", text);
    const r = await post(`/runs/${name}/chat`, { gguf: document.getElementById("gguf").value, messages: history });
    if (r.ok) {
      history.push({ role: "assistant", content: r.reply });
      addChat("assistant", `${r.reply || "(no text: the model ended its answer at once)"} (${r.tokens} tokens)`);
    }
    else { history.pop(); addChat("error", `[${r.error.code}]: ${r.error.message}`); }
  });
}

function addChat(role, text) {
  const p = document.createElement("p");
  p.className = `chat ${role}`;
  p.textContent = text;
  document.getElementById("chat-log").append(p);
}

function showExport(job) {
  if (!job) return;
  const bar = document.getElementById("export-progress");
  bar.max = job.total || 1;
  bar.value = job.state === "done" ? bar.max : job.done;
  const state = document.getElementById("export-state");
  state.textContent = job.state === "done" ? `done: ${job.path} (${job.seconds} s)` : job.state;
  if (job.error) state.textContent += ` [${job.error.code}]: ${job.error.message}`;
  const select = document.getElementById("gguf");
  if (job.state === "done" && job.path && job.path.endsWith(".gguf") && ![...select.options].some((o) => o.value === job.path)) {
    select.append(new Option(job.path, job.path, true, true));
  }
}

async function compareRuns(names) {
  const series = await Promise.all(names.map(async (n, i) => {
    const ms = await (await fetch(`/runs/${encodeURIComponent(n)}/metrics`, { headers: { Accept: "application/json" } })).json();
    return { points: ms.map((m) => [m.step, m.loss]), cls: i ? "lr" : "loss" }; // the second run in orange
  }));
  drawChart(document.getElementById("chart"), series);
}

document.addEventListener("DOMContentLoaded", () => {
  const run = document.getElementById("run");
  if (run) watchRun(run.dataset.name);
  const chart = document.getElementById("chart");
  if (chart && chart.dataset.compare) compareRuns(chart.dataset.compare.split(","));
});
