// shoal dashboard: polls the admin API every second and draws plain SVG. No dependencies.
//
// What it reads: GET /api/serve/applications/ (the same JSON as `shoal status`),
// GET /api/shoal/dashboard/timeseries?since=T (new points per deployment) and
// GET /api/shoal/dashboard/errors. Everything it shows is in window.shoalDashboard too
// (the series, the last details, how many polls succeeded), for tests and the console.
"use strict";

(() => {
  const POLL_MS = 1000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TIMESERIES = "/api/shoal/dashboard/timeseries";
  const ERRORS = "/api/shoal/dashboard/errors";
  const ERRORS_SHOWN = 10; // the older ones behind a click
  const GOOD = new Set(["RUNNING", "HEALTHY"]);
  const BAD = new Set(["DEPLOY_FAILED", "UNHEALTHY"]);

  const state = {
    polls: 0, // successful polls
    failures: 0,
    lastError: null,
    since: null, // newest point time received: the next poll asks only for newer ones
    now: null, // the server's clock at the last poll (plots and markers use it)
    windowS: 600,
    metrics: true,
    details: null,
    errors: [],
    series: new Map(), // JSON [application, deployment] -> {t: [...], request_rate: [...], ...}
    seriesOf(application, deployment) {
      return this.series.get(JSON.stringify([application, deployment])) || null;
    },
  };
  window.shoalDashboard = state;

  const view = () => Number(document.getElementById("view").value) || 300;

  // --- DOM helpers (text only: nothing from the server is ever parsed as HTML) ----------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("data-")) node.dataset[camel(name.slice(5))] = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
    return node;
  }

  function sv(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function camel(name) {
    return name.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
  }

  function tone(status) {
    if (GOOD.has(status)) return "good";
    if (BAD.has(status)) return "bad";
    return "warn";
  }

  function badge(status) {
    return el("span", { class: `badge ${tone(status)}`, "data-status": status }, status);
  }

  function fmt(value, unit) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    const abs = Math.abs(value);
    let text;
    if (abs >= 10000) text = `${(value / 1000).toFixed(0)}k`;
    else if (abs >= 1000) text = `${(value / 1000).toFixed(1)}k`;
    else if (abs >= 100 || Number.isInteger(value)) text = value.toFixed(0);
    else if (abs >= 10) text = value.toFixed(1);
    else text = value.toFixed(2);
    return unit ? `${text} ${unit}` : text;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  // --- polling --------------------------------------------------------------------------

  async function getJSON(path) {
    const reply = await fetch(path, { cache: "no-store" });
    if (!reply.ok) throw new Error(`${path}: ${reply.status} ${(await reply.text()).trim()}`);
    return reply.json();
  }

  async function poll() {
    try {
      const since = state.since === null ? "" : `?since=${state.since}`;
      const [details, series, errors] = await Promise.all([
        getJSON("/api/serve/applications/"),
        getJSON(TIMESERIES + since),
        getJSON(ERRORS),
      ]);
      state.details = details;
      state.errors = errors.errors || [];
      merge(series);
      state.polls += 1;
      state.lastError = null;
      render();
    } catch (error) {
      state.failures += 1;
      state.lastError = String(error);
      connection();
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function merge(reply) {
    state.now = reply.now;
    state.windowS = reply.window_s;
    state.metrics = reply.metrics;
    for (const entry of reply.deployments) {
      const key = JSON.stringify([entry.application, entry.deployment]);
      let series = state.series.get(key);
      if (!series) state.series.set(key, (series = {}));
      for (const [column, values] of Object.entries(entry.points)) {
        (series[column] = series[column] || []).push(...values);
      }
      const t = entry.points.t;
      if (t.length) state.since = Math.max(state.since ?? 0, t[t.length - 1]);
    }
    const oldest = state.now - state.windowS;
    for (const [key, series] of state.series) {
      const t = series.t || [];
      let drop = 0;
      while (drop < t.length && t[drop] < oldest) drop += 1;
      if (drop === t.length) state.series.delete(key);
      else if (drop) for (const column of Object.keys(series)) series[column].splice(0, drop);
    }
  }

  // --- rendering ------------------------------------------------------------------------

  const cards = new Map(); // application name -> {root, deployments: Map(name -> parts)}
  let errorsShown = null;
  let configShown = null;

  function render() {
    connection();
    const details = state.details;
    const info = details.controller_info || {};
    const http = details.http_options || {};
    const proxies = Object.values(details.proxies || {}).map((p) => p.status);
    document.getElementById("instance").textContent =
      `pid ${info.pid} · HTTP ${details.proxy_location === "Disabled" ? "off" : `${http.host}:${http.port}`}` +
      (proxies.length ? ` (proxy ${proxies.join(", ")})` : "") +
      (details.target_capacity !== null && details.target_capacity !== undefined
        ? ` · target capacity ${details.target_capacity}%` : "");
    const notice = document.getElementById("notice");
    notice.hidden = state.metrics;
    notice.textContent = "This instance records no metrics: the plots show replica counts only.";
    applications(details.applications || {});
    errorList(state.errors);
    configs(details.applications || {});
  }

  function connection() {
    const node = document.getElementById("connection");
    const live = state.lastError === null && state.polls > 0;
    node.className = `badge ${live ? "good" : "bad"}`;
    node.textContent = live ? `live · ${clock(state.now)}` : "disconnected";
    node.title = state.lastError || "";
  }

  function applications(apps) {
    const root = document.getElementById("applications");
    const names = Object.keys(apps).sort();
    if (!names.length) {
      cards.clear();
      root.replaceChildren(el("p", { class: "muted" }, "No application is deployed."));
      return;
    }
    for (const name of [...cards.keys()]) if (!(name in apps)) cards.delete(name);
    root.replaceChildren(...names.map((name) => application(name, apps[name]).root));
  }

  function application(name, app) {
    let card = cards.get(name);
    if (!card) {
      const head = el("div", { class: "app-head" });
      const message = el("div");
      const body = el("div");
      card = {
        root: el("div", { class: "app", "data-app": name }, head, message, body),
        head, message, body, deployments: new Map(),
      };
      cards.set(name, card);
    }
    card.root.dataset.status = app.status;
    card.head.replaceChildren(...[
      el("span", { class: "name" }, name),
      badge(app.status),
      el("span", { class: "muted" }, app.route_prefix ? `route ${app.route_prefix}` : "no route"),
      app.direct_ingress_port ? el("span", { class: "muted" }, `direct port ${app.direct_ingress_port}`) : null,
      el("span", { class: "muted" }, app.source === "declarative" ? "from a config file" : "serve.run"),
      app.last_deployed_time_s ? el("span", { class: "muted" }, `deployed ${clock(app.last_deployed_time_s)}`) : null,
    ].filter(Boolean));
    card.message.replaceChildren(...reason(app.message, app.status));
    const deployments = app.deployments || {};
    for (const dep of [...card.deployments.keys()]) if (!(dep in deployments)) card.deployments.delete(dep);
    const parts = Object.keys(deployments).sort().map((dep) => deployment(card, name, dep, deployments[dep]));
    card.body.replaceChildren(...parts.map((p) => p.root));
    return card;
  }

  function reason(message, status) {
    if (!message || GOOD.has(status)) return [];
    return [el("div", { class: `message ${BAD.has(status) ? "" : "warn"}` }, message)];
  }

  const PLOTS = [
    { id: "request_rate", title: "Requests / s", lines: [["request_rate", "requests/s", "s1"]] },
    { id: "latency", title: "Latency (ms)", unit: "ms",
      lines: [["p50_ms", "p50", "s1"], ["p95_ms", "p95", "s2"], ["p99_ms", "p99", "s3"]] },
    { id: "error_rate", title: "Errors / s", lines: [["error_rate", "errors/s", "s3"]] },
    { id: "replicas", title: "Replicas (◆ scaling decisions)", integer: true,
      lines: [["replicas", "running", "s1"], ["target_replicas", "target", "s4 dashed"]] },
    { id: "batch", title: "Batch size", optional: true,
      lines: [["batch_mean", "mean", "s1"], ["batch_p95", "p95", "s2"]] },
  ];

  function deployment(card, app, name, dep) {
    let parts = card.deployments.get(name);
    if (!parts) {
      const head = el("div", { class: "dep-head" });
      const message = el("div");
      const replicas = el("div");
      const plots = el("div", { class: "plots" });
      const charts = {};
      for (const plot of PLOTS) {
        const value = el("span", { class: "value" });
        const svgNode = sv("svg", { class: "chart", viewBox: "0 0 320 130", role: "img" });
        svgNode.dataset.plot = plot.id;
        const figure = el("figure", { "data-plot": plot.id },
          el("figcaption", {}, el("span", {}, plot.title), value), svgNode);
        plots.append(figure);
        charts[plot.id] = { figure, value, svg: svgNode };
      }
      parts = {
        root: el("div", { class: "deployment", "data-app": app, "data-deployment": name },
          head, message, replicas, plots),
        head, message, replicas, charts,
      };
      card.deployments.set(name, parts);
    }
    parts.root.dataset.status = dep.status;
    const reps = dep.replicas || [];
    const running = reps.filter((r) => r.state === "RUNNING").length;
    parts.head.replaceChildren(
      el("span", { class: "name" }, name),
      badge(dep.status),
      el("span", { class: "muted" },
        `${running}/${reps.length} replicas running · target ${dep.target_num_replicas ?? "–"}`),
    );
    parts.message.replaceChildren(...reason(dep.message, dep.status));
    parts.replicas.replaceChildren(replicaTable(reps));
    plotsOf(parts, state.seriesOf(app, name), dep.scaling_decisions || []);
    return parts;
  }

  function replicaTable(replicas) {
    if (!replicas.length) return el("p", { class: "muted" }, "no replica");
    const rows = replicas.map((r) => el("tr", { "data-replica": r.replica_id, "data-state": r.state },
      el("td", { class: "mono" }, r.replica_id),
      el("td", {}, badge(r.state)),
      el("td", { class: "mono" }, r.pid === null || r.pid === undefined ? "–" : String(r.pid)),
      el("td", {}, ...(r.state === "RUNNING" || !r.message ? [] : [el("div", { class: "message warn" }, r.message)])),
    ));
    return el("table", { class: "replicas" },
      el("tr", {}, el("th", {}, "replica"), el("th", {}, "state"), el("th", {}, "pid"), el("th", {}, "reason")),
      ...rows);
  }

  function plotsOf(parts, series, decisions) {
    for (const plot of PLOTS) {
      const chart = parts.charts[plot.id];
      const lines = plot.lines.map(([column, label, cls]) => ({
        label, cls, values: (series && series[column]) || [],
      }));
      const hasData = lines.some((l) => l.values.some((v) => v !== null));
      if (plot.optional) {
        chart.figure.hidden = !hasData;
        if (!hasData) continue;
      }
      const latest = lines.map((l) => l.values[l.values.length - 1]);
      chart.value.textContent = lines.length === 1
        ? fmt(latest[0], plot.unit)
        : lines.map((l, i) => `${l.label} ${fmt(latest[i])}`).join(" · ");
      draw(chart.svg, (series && series.t) || [], lines, plot, plot.id === "replicas" ? decisions : []);
    }
  }

  // --- the plot -------------------------------------------------------------------------

  function niceCeiling(value, integer) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) {
      const top = step * power;
      if (top >= value) return integer ? Math.max(1, Math.ceil(top)) : top;
    }
    return value;
  }

  function draw(svgNode, times, lines, plot, decisions) {
    const W = 320, H = 130, left = 34, right = 6, top = 14, bottom = 16;
    const t1 = state.now, t0 = t1 - view();
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (W - left - right);
    let shown = 0;
    let ymax = 0;
    for (const line of lines) {
      for (let i = 0; i < times.length; i += 1) {
        const v = line.values[i];
        if (times[i] >= t0 && v !== null && v !== undefined) { ymax = Math.max(ymax, v); shown += 1; }
      }
    }
    ymax = niceCeiling(ymax, plot.integer);
    const y = (v) => top + (1 - v / ymax) * (H - top - bottom);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      const value = ymax * frac;
      nodes.push(sv("line", { class: "grid", x1: left, x2: W - right, y1: y(value), y2: y(value) }));
      if (!plot.integer || Number.isInteger(value)) {
        nodes.push(sv("text", { x: left - 4, y: y(value) + 3, "text-anchor": "end" }, fmt(value)));
      }
    }
    const span = view();
    nodes.push(sv("text", { x: left, y: H - 3 }, `−${span >= 120 ? `${span / 60} min` : `${span} s`}`));
    nodes.push(sv("text", { x: W - right, y: H - 3, "text-anchor": "end" }, "now"));
    lines.forEach((line, index) => {
      let d = "";
      let run = 0; // points in the current segment: a lone one is drawn as a dot
      const dot = () => { if (run === 1) d += "h0.01"; };
      for (let i = 0; i < times.length; i += 1) {
        const v = line.values[i];
        if (times[i] < t0 || v === null || v === undefined) { dot(); run = 0; continue; }
        d += `${run ? "L" : "M"}${x(times[i]).toFixed(1)},${y(v).toFixed(1)}`;
        run += 1;
      }
      dot();
      if (d) {
        const path = sv("path", { class: `line ${line.cls}`, d });
        path.append(sv("title", {}, line.label));
        nodes.push(path);
      }
      if (lines.length > 1) {
        const lx = left + 4 + index * 62;
        nodes.push(sv("text", { class: `legend ${line.cls.split(" ")[0]}`, x: lx, y: 10 }, `— ${line.label}`));
      }
    });
    for (const decision of decisions) {
      if (decision.time < t0 || decision.time > t1 + 5) continue;
      const dx = Math.min(x(decision.time), W - right);
      const marker = sv("g", { class: "decision" });
      marker.append(
        sv("line", { class: "marker", x1: dx, x2: dx, y1: top, y2: H - bottom }),
        sv("path", { class: "marker-head", d: `M${dx - 4},${top - 1}L${dx},${top + 4}L${dx + 4},${top - 1}Z` }),
        sv("title", {}, `${clock(decision.time)} ${decision.from_replicas} → ${decision.to_replicas}: ${decision.reason}`),
      );
      nodes.push(marker);
    }
    if (!shown) {
      const why = state.metrics || plot.id === "replicas" ? "no data yet" : "metrics are off";
      nodes.push(sv("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, why));
    }
    svgNode.replaceChildren(...nodes);
    svgNode.dataset.points = String(shown);
    const first = lines[0].values;
    svgNode.dataset.last = first.length ? String(first[first.length - 1]) : "";
  }

  // --- errors and config ----------------------------------------------------------------

  function errorList(errors) {
    const signature = JSON.stringify(errors.map((e) => [e.time, e.request_id, e.replica]));
    if (signature === errorsShown) return; // keep opened tracebacks open
    errorsShown = signature;
    const root = document.getElementById("errors");
    if (!errors.length) {
      root.replaceChildren(el("p", { class: "muted" }, "No error recorded."));
      return;
    }
    const row = (e) => el("tr", { "data-request-id": e.request_id || "" },
      el("td", { class: "mono" }, e.time ? clock(e.time) : "–"),
      el("td", {}, `${e.application || "–"} / ${e.deployment || "–"}`),
      el("td", { class: "mono" }, e.replica || "–"),
      el("td", { class: "mono" }, e.request_id || "–"),
      el("td", {},
        el("strong", {}, e.type || "Error"), `: ${e.message || ""}`,
        e.traceback ? remembered(`${e.time} ${e.request_id}`,
          el("summary", { class: "muted" }, "traceback"), el("pre", {}, e.traceback)) : null),
    );
    const table = (list) => el("table", { class: "errors" },
      el("tr", {}, ...["time", "application / deployment", "replica", "request id", "error"].map((h) => el("th", {}, h))),
      ...list.map(row));
    const older = errors.slice(ERRORS_SHOWN);
    root.replaceChildren(table(errors.slice(0, ERRORS_SHOWN)), older.length
      ? remembered("older", el("summary", { class: "muted" }, `${older.length} older`), table(older))
      : "");
  }

  // A <details> that stays open or closed as the user left it when the list is redrawn.
  const opened = new Set();
  function remembered(key, ...children) {
    const node = el("details", { open: opened.has(key) }, ...children);
    node.addEventListener("toggle", () => (node.open ? opened.add(key) : opened.delete(key)));
    return node;
  }

  function configs(apps) {
    const shown = Object.keys(apps).sort().flatMap((name) => {
      const app = apps[name];
      if (app.deployed_app_config) return [[name, "config file", app.deployed_app_config]];
      const deployments = {};
      for (const [dep, d] of Object.entries(app.deployments || {})) deployments[dep] = d.deployment_config;
      // An application whose config did not build yet (or failed to) has nothing deployed.
      return Object.keys(deployments).length ? [[name, "serve.run: deployment options", { deployments }]] : [];
    });
    const signature = JSON.stringify(shown);
    if (signature === configShown) return; // keep opened blocks open
    configShown = signature;
    const root = document.getElementById("config");
    if (!shown.length) {
      root.replaceChildren(el("p", { class: "muted" }, "none"));
      return;
    }
    root.replaceChildren(...shown.map(([name, source, config]) => el("details", { class: "config", "data-app": name },
      el("summary", {}, el("strong", {}, name), " ", el("span", { class: "muted" }, `(${source})`)),
      el("pre", { class: "mono" }, JSON.stringify(config, null, 2)))));
  }

  document.getElementById("view").addEventListener("change", () => { if (state.details) render(); });
  poll();
})();
