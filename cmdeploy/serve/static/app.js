/* cmdeploy annotate: four clicks -> mask, Enter accepts, ] / [ propagate, export.
 *
 * Plain JS, no build step, no network access beyond this server (/api/v1, same origin).
 * Coordinates: image pixels, x = column, y = row, pixel centres at integers (the points-CSV
 * convention); pixel (x, y) covers [x - 0.5, x + 0.5] on screen.
 *
 * Sections: api, state, rendering, interaction (mouse, keys), actions (segment, accept,
 * propagate, export), sidebar lists, start-up.
 */
"use strict";

(function () {
  // ------------------------------------------------------------------------------------- api
  const API = "/api/v1";
  let token = sessionStorage.getItem("cmdeploy-token") || "";
  const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
  if (hashToken) {
    token = hashToken;
    sessionStorage.setItem("cmdeploy-token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token) headers.Authorization = "Bearer " + token;
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(options.json);
    }
    const res = await fetch(API + path, { method: options.method || "GET", headers, body: options.body });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    if (options.raw) return res.arrayBuffer();
    return res.status === 204 ? null : res.json();
  }

  // ----------------------------------------------------------------------------------- state
  const PRESETS = {
    soft: { ww: 400, wl: 40, name: "Soft tissue" },
    lung: { ww: 1500, wl: -600, name: "Lung" },
    bone: { ww: 1800, wl: 400, name: "Bone" },
  };
  const PALETTE = ["#ff6b6b", "#4ecdc4", "#ffd166", "#a78bfa", "#5ec8ff", "#f78fb3", "#8bd17c",
                   "#ff9f43", "#e5e5e5", "#c0a36e"];
  const DEFAULT_LABELS = ["aorta", "heart", "liver", "spleen", "kidney_left", "kidney_right",
                          "esophagus", "trachea", "pancreas", "stomach", "vertebra", "lesion"];
  const ROLES = ["L", "R", "T", "B"];

  const state = {
    series: [],
    geo: null,            // geometry of the open series
    k: 0,
    slices: new Map(),    // k -> Int16Array of HU
    ww: 400, wl: 40,
    clicks: [],           // [[x, y], ...] of the current slice, click order
    proposal: null,       // {k, points (sorted), mask: Uint8Array, contour, area}
    objects: [],          // accepted objects of the series (with decoded masks)
    selected: null,       // selected object id (propagation source)
    lastAccepted: null,   // propagation source after an accept
    pending: 0,           // requests in flight (exposed as body[data-busy])
    segmentSeq: 0,
    labels: [],
  };

  const $ = (id) => document.getElementById(id);
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const imageCanvas = document.createElement("canvas");   // windowed slice, native size
  const overlayCanvas = document.createElement("canvas"); // mask fills, native size
  let view = { scale: 1, ox: 0, oy: 0 };                  // image -> canvas (device px)

  function busy(delta) {
    state.pending += delta;
    document.body.dataset.busy = state.pending > 0 ? "1" : "0";
  }

  function status(text, kind = "") {
    const el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }

  function colorFor(label) {
    let h = 0;
    for (const ch of label) h = (h * 31 + ch.codePointAt(0)) >>> 0;
    return PALETTE[h % PALETTE.length];
  }

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  function decodeRle(mask) {
    const out = new Uint8Array(mask.rows * mask.columns);
    let pos = 0;
    mask.rle.forEach((run, i) => {
      if (i % 2 === 1) out.fill(1, pos, pos + run);
      pos += run;
    });
    return out;
  }

  // ------------------------------------------------------------------------------- rendering
  function fit() {
    const dpr = window.devicePixelRatio || 1;
    const rect = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(rect.width * dpr));
    canvas.height = Math.max(1, Math.round(rect.height * dpr));
    if (!state.geo) return;
    const { rows, columns } = state.geo;
    const sx = state.geo.spacing_xy_mm ? state.geo.spacing_xy_mm[0] : 1;
    const sy = state.geo.spacing_xy_mm ? state.geo.spacing_xy_mm[1] : 1;
    const aspect = sy / sx;  // screen height of one row relative to one column
    const margin = 24 * dpr;
    const scale = Math.min((canvas.width - 2 * margin) / columns, (canvas.height - 2 * margin) / (rows * aspect));
    view = {
      scale, aspect,
      ox: (canvas.width - columns * scale) / 2,
      oy: (canvas.height - rows * aspect * scale) / 2,
    };
  }

  function toCanvas(x, y) {  // image pixel centre -> canvas device px
    return [view.ox + (x + 0.5) * view.scale, view.oy + (y + 0.5) * view.scale * view.aspect];
  }

  function toImage(cx, cy) {  // canvas device px -> image coordinates (pixel centres at integers)
    return [(cx - view.ox) / view.scale - 0.5, (cy - view.oy) / (view.scale * view.aspect) - 0.5];
  }

  function renderImage() {
    const hu = state.slices.get(state.k);
    if (!state.geo || !hu) return;
    const { rows, columns } = state.geo;
    imageCanvas.width = columns; imageCanvas.height = rows;
    const ictx = imageCanvas.getContext("2d");
    const img = ictx.createImageData(columns, rows);
    const lo = state.wl - state.ww / 2, f = 255 / state.ww, d = img.data;
    for (let i = 0, j = 0; i < hu.length; i++, j += 4) {
      let v = (hu[i] - lo) * f;
      v = v < 0 ? 0 : v > 255 ? 255 : v;
      d[j] = d[j + 1] = d[j + 2] = v; d[j + 3] = 255;
    }
    ictx.putImageData(img, 0, 0);
  }

  function renderOverlay() {
    if (!state.geo) return;
    const { rows, columns } = state.geo;
    overlayCanvas.width = columns; overlayCanvas.height = rows;
    const octx = overlayCanvas.getContext("2d");
    const img = octx.createImageData(columns, rows);
    const d = img.data;
    const paint = (bits, rgb, alpha) => {
      for (let i = 0, j = 0; i < bits.length; i++, j += 4) {
        if (bits[i]) { d[j] = rgb[0]; d[j + 1] = rgb[1]; d[j + 2] = rgb[2]; d[j + 3] = alpha; }
      }
    };
    for (const o of objectsOnSlice()) paint(o.bits, hexToRgb(colorFor(o.label)), o.id === state.selected ? 64 : 52);
    if (state.proposal && state.proposal.k === state.k) paint(state.proposal.mask, [80, 200, 255], 95);
    octx.putImageData(img, 0, 0);
  }

  function drawContour(points, color, width, dash) {
    if (!points || points.length < 2) return;
    ctx.save();
    ctx.strokeStyle = color; ctx.lineWidth = width; ctx.setLineDash(dash || []);
    ctx.lineJoin = "round";
    ctx.beginPath();
    points.forEach(([x, y], i) => {
      const [cx, cy] = toCanvas(x, y);
      if (i === 0) ctx.moveTo(cx, cy); else ctx.lineTo(cx, cy);
    });
    ctx.closePath(); ctx.stroke(); ctx.restore();
  }

  function drawPoints(points, roles) {
    const dpr = window.devicePixelRatio || 1;
    ctx.save();
    ctx.font = `${Math.round(11 * dpr)}px system-ui, sans-serif`;
    ctx.textBaseline = "middle";
    points.forEach(([x, y], i) => {
      const [cx, cy] = toCanvas(x, y);
      ctx.beginPath(); ctx.arc(cx, cy, 5 * dpr, 0, 2 * Math.PI);
      ctx.fillStyle = "#ffd84a"; ctx.fill();
      ctx.lineWidth = 1.5 * dpr; ctx.strokeStyle = "#000"; ctx.stroke();
      const tag = roles ? ROLES[i] : String(i + 1);
      ctx.lineWidth = 3 * dpr; ctx.strokeStyle = "#000"; ctx.fillStyle = "#ffd84a";
      ctx.strokeText(tag, cx + 8 * dpr, cy - 8 * dpr); ctx.fillText(tag, cx + 8 * dpr, cy - 8 * dpr);
    });
    ctx.restore();
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!state.geo || !state.slices.has(state.k)) { drawCorners(); return; }
    const w = state.geo.columns * view.scale, h = state.geo.rows * view.scale * view.aspect;
    ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "high";
    ctx.drawImage(imageCanvas, view.ox, view.oy, w, h);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(overlayCanvas, view.ox, view.oy, w, h);
    for (const o of objectsOnSlice()) {
      drawContour(o.contour, colorFor(o.label), (o.id === state.selected ? 2.5 : 1.5) * dpr);
    }
    const p = state.proposal && state.proposal.k === state.k ? state.proposal : null;
    if (p) drawContour(p.contour, "#5ec8ff", 2 * dpr, [6 * dpr, 4 * dpr]);
    if (p) drawPoints(p.points, true); else drawPoints(state.clicks, false);
    drawCorners();
  }

  function drawCorners(cursor) {
    const g = state.geo;
    if (!g) { ["tl", "tr", "bl", "br"].forEach((c) => { $("corner-" + c).textContent = ""; }); return; }
    const letters = g.orientation_labels || ["", "", "", ""];
    ["l", "r", "t", "b"].forEach((side, i) => { $("orient-" + side).textContent = letters[i]; });
    const pos = g.slice_positions_mm ? `  ${g.slice_positions_mm[state.k].toFixed(1)} mm` : "";
    $("corner-tl").textContent = `${g.name}\nSlice ${state.k + 1} / ${g.num_slices}${pos}\n${g.columns} × ${g.rows}`;
    $("corner-tr").textContent = `W ${Math.round(state.ww)}  L ${Math.round(state.wl)}`;
    if (cursor !== undefined) $("corner-bl").textContent = cursor;
    const n = state.proposal && state.proposal.k === state.k ? 4 : state.clicks.length;
    const area = state.proposal && state.proposal.k === state.k
      ? (state.proposal.area_mm2 != null ? `${state.proposal.area_mm2.toFixed(0)} mm²` : `${state.proposal.area_px} px`) : "";
    $("corner-br").textContent = `points ${n}/4${area ? "\n" + area : ""}`;
  }

  function objectsOnSlice() {
    return state.objects.filter((o) => o.slice_index === state.k);
  }

  function redrawAll() { renderImage(); renderOverlay(); draw(); }

  // ----------------------------------------------------------------------------- slice data
  async function loadSlice(k) {
    if (state.slices.has(k)) return state.slices.get(k);
    const buf = await api(`/series/${state.geo.id}/slices/${k}`, { raw: true });
    const arr = new Int16Array(buf);
    state.slices.set(k, arr);
    if (state.slices.size > 64) state.slices.delete(state.slices.keys().next().value);
    return arr;
  }

  function prefetch(k) {
    for (const j of [k + 1, k - 1, k + 2]) {
      if (state.geo && j >= 0 && j < state.geo.num_slices && !state.slices.has(j)) {
        loadSlice(j).catch(() => {});
      }
    }
  }

  async function goToSlice(k, keepProposal = false) {
    if (!state.geo) return;
    k = Math.max(0, Math.min(state.geo.num_slices - 1, k));
    if (k !== state.k) {
      state.clicks = [];
      if (!keepProposal) state.proposal = null;
    }
    state.k = k;
    $("slice-slider").value = String(k);
    $("slice-label").textContent = `${k + 1} / ${state.geo.num_slices}`;
    busy(+1);
    try {
      await loadSlice(k);
    } catch (e) {
      status("Cannot load slice: " + e.message, "err");
    } finally {
      busy(-1);
    }
    if (state.k !== k) return;  // the user scrolled on meanwhile
    redrawAll();
    renderObjects();
    updateButtons();
    prefetch(k);
  }

  // ------------------------------------------------------------------------------- actions
  async function openSeries(id) {
    busy(+1);
    try {
      state.geo = await api(`/series/${id}`);
      state.slices = new Map();
      state.clicks = []; state.proposal = null; state.selected = null; state.lastAccepted = null;
      state.objects = (await api(`/series/${id}/objects`)).map(withBits);
      document.querySelectorAll("#series-list li").forEach((li) => li.classList.toggle("active", li.dataset.id === id));
      $("topbar-series").textContent = `${state.geo.name} · ${state.geo.kind} · ${state.geo.num_slices} slices`;
      $("slice-slider").max = String(state.geo.num_slices - 1);
      const isDicom = state.geo.kind.startsWith("dicom");
      $("fmt-seg").disabled = !isDicom; $("fmt-seg").checked = isDicom;
      fit();
      state.k = -1;
      await goToSlice(Math.floor(state.geo.num_slices / 2));
      status("Click the four extreme points of a structure (left, right, top, bottom; any order).");
    } catch (e) {
      status("Cannot open series: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  function withBits(o) {
    return Object.assign(o, { bits: o.mask ? decodeRle(o.mask) : null });
  }

  async function segment() {
    const seq = ++state.segmentSeq;
    const k = state.k;
    const t0 = performance.now();
    busy(+1);
    try {
      const r = await api(`/series/${state.geo.id}/segment`, { method: "POST", json: { slice_index: k, points: state.clicks } });
      if (seq !== state.segmentSeq || state.k !== k || state.clicks.length !== 4) return;
      showProposal(r, performance.now() - t0, "mask");
    } catch (e) {
      status("Segmentation failed: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  function showProposal(r, ms, what) {
    state.proposal = {
      k: r.slice_index, points: r.points, mask: decodeRle(r.mask), rle: r.mask.rle,
      contour: r.contour, area_px: r.area_px, area_mm2: r.area_mm2,
    };
    state.clicks = r.points.slice();
    $("latency").textContent = `${what} in ${ms.toFixed(0)} ms · model ${r.model_ms.toFixed(1)} ms` +
      (r.batch_size > 1 ? ` (batch ${r.batch_size})` : "");
    renderOverlay(); draw(); updateButtons();
    status(r.area_px ? "Enter accepts · ⌫ moves the last point · Esc clears."
                     : "Empty mask: move a point (⌫) and click again.", r.area_px ? "" : "err");
  }

  function currentLabel() {
    const input = $("label-input");
    const label = input.value.trim();
    if (!label) {
      input.classList.add("invalid"); input.focus();
      status("Type a label first (e.g. aorta), then Enter.", "err");
      return null;
    }
    input.classList.remove("invalid");
    return label;
  }

  async function accept() {
    const p = state.proposal;
    if (!p || p.k !== state.k || !p.area_px) return;
    const label = currentLabel();
    if (!label) return;
    busy(+1);
    try {
      const o = await api(`/series/${state.geo.id}/objects`, {
        method: "POST",
        json: { label, slice_index: p.k, points: p.points, mask: { rows: state.geo.rows, columns: state.geo.columns, rle: p.rle } },
      });
      state.objects.push(withBits(o));
      state.proposal = null; state.clicks = [];
      state.lastAccepted = o.id; state.selected = o.id;
      rememberLabel(label);
      renderOverlay(); draw(); renderObjects(); updateButtons();
      status(`Accepted “${label}” on slice ${p.k + 1}. ] / [ propagates to the next / previous slice.`, "ok");
    } catch (e) {
      status("Accept failed: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  async function propagate(direction) {
    const source = state.objects.find((o) => o.id === (state.selected || state.lastAccepted));
    if (!source) { status("Accept or select an object first, then propagate.", "err"); return; }
    const target = source.slice_index + direction;
    if (target < 0 || target >= state.geo.num_slices) { status("No slice beyond this one.", "err"); return; }
    const t0 = performance.now();
    busy(+1);
    try {
      const r = await api(`/series/${state.geo.id}/propagate`, { method: "POST", json: { object_id: source.id, direction } });
      $("label-input").value = source.label;
      state.selected = null;
      state.proposal = null;
      await goToSlice(r.slice_index, true);
      if (state.k !== r.slice_index) return;
      showProposal(r, performance.now() - t0, "propagated");
    } catch (e) {
      status("Propagation failed: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  async function deleteObject(id) {
    busy(+1);
    try {
      await api(`/series/${state.geo.id}/objects/${id}`, { method: "DELETE" });
      state.objects = state.objects.filter((o) => o.id !== id);
      if (state.selected === id) state.selected = null;
      if (state.lastAccepted === id) state.lastAccepted = null;
      renderOverlay(); draw(); renderObjects(); updateButtons();
      status("Object deleted.");
    } catch (e) {
      status("Delete failed: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  async function exportAll() {
    const formats = ["fmt-seg", "fmt-nifti", "fmt-csv"].map($).filter((c) => c.checked && !c.disabled).map((c) => c.value);
    const out = $("export-result");
    if (!formats.length) { out.textContent = "Choose at least one format."; out.className = "export-result err"; return; }
    busy(+1);
    try {
      const r = await api(`/series/${state.geo.id}/export`, { method: "POST", json: { formats } });
      out.textContent = `${r.objects} object(s) → ${r.files.join(", ")} in ${r.folder}`;
      out.className = "export-result ok";
      status("Export written.", "ok");
    } catch (e) {
      out.textContent = e.message; out.className = "export-result err";
      status("Export failed: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  function setPreset(name) {
    const p = PRESETS[name];
    state.ww = p.ww; state.wl = p.wl;
    document.querySelectorAll(".preset").forEach((b) => b.classList.toggle("active", b.dataset.preset === name));
    renderImage(); draw();
  }

  // --------------------------------------------------------------------------- sidebar lists
  function renderSeries() {
    const ul = $("series-list");
    ul.replaceChildren(...state.series.map((s) => {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.title = s.name;
      const name = document.createElement("span"); name.className = "name"; name.textContent = s.name;
      const meta = document.createElement("span"); meta.className = "meta";
      meta.textContent = `${s.kind} · ${s.num_slices} slice${s.num_slices === 1 ? "" : "s"} · ${s.columns} × ${s.rows}`;
      li.append(name, meta);
      li.addEventListener("click", () => openSeries(s.id));
      return li;
    }));
  }

  function renderObjects() {
    const all = $("all-slices").checked;
    const list = (all ? state.objects.slice().sort((a, b) => a.slice_index - b.slice_index || a.id - b.id) : objectsOnSlice());
    const ul = $("objects-list");
    ul.replaceChildren(...list.map((o) => {
      const li = document.createElement("li");
      li.dataset.id = String(o.id);
      li.classList.toggle("selected", o.id === state.selected);
      const sw = document.createElement("span"); sw.className = "swatch"; sw.style.background = colorFor(o.label);
      const lab = document.createElement("span"); lab.className = "obj-label"; lab.textContent = o.label;
      const meta = document.createElement("span"); meta.className = "obj-meta";
      meta.textContent = `sl ${o.slice_index + 1} · ` + (o.area_mm2 != null ? `${o.area_mm2.toFixed(0)} mm²` : `${o.area_px} px`);
      const del = document.createElement("button"); del.className = "del"; del.textContent = "×"; del.title = "Delete";
      del.addEventListener("click", (ev) => { ev.stopPropagation(); deleteObject(o.id); });
      li.append(sw, lab, meta, del);
      li.addEventListener("click", async () => {
        state.selected = o.id;
        $("label-input").value = o.label;
        if (o.slice_index !== state.k) await goToSlice(o.slice_index);
        renderOverlay(); draw(); renderObjects(); updateButtons();
      });
      return li;
    }));
    $("objects-empty").classList.toggle("hidden", list.length > 0);
    $("objects-empty").textContent = all ? "No accepted objects yet." : "No accepted objects on this slice.";
  }

  function rememberLabel(label) {
    state.labels = [label, ...state.labels.filter((l) => l !== label)];
    renderLabelOptions();
  }

  function renderLabelOptions() {
    const names = [...state.labels, ...DEFAULT_LABELS.filter((l) => !state.labels.includes(l))];
    $("label-options").replaceChildren(...names.map((n) => { const o = document.createElement("option"); o.value = n; return o; }));
  }

  function updateButtons() {
    const hasProposal = !!(state.proposal && state.proposal.k === state.k && state.proposal.area_px);
    const source = state.selected || state.lastAccepted;
    $("accept-btn").disabled = !hasProposal;
    $("prop-next-btn").disabled = !source;
    $("prop-prev-btn").disabled = !source;
    $("export-btn").disabled = !state.objects.length;
    drawCorners();
  }

  // ---------------------------------------------------------------------------- interaction
  let drag = null;
  let wheelAcc = 0;

  function eventImagePoint(ev) {
    const rect = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    return toImage((ev.clientX - rect.left) * dpr, (ev.clientY - rect.top) * dpr);
  }

  function insideImage([x, y]) {
    return state.geo && x >= -0.5 && y >= -0.5 && x <= state.geo.columns - 0.5 && y <= state.geo.rows - 0.5;
  }

  function addClick(pt) {
    if (state.clicks.length >= 4) { state.clicks = []; state.proposal = null; renderOverlay(); }
    state.clicks.push([Math.round(pt[0] * 100) / 100, Math.round(pt[1] * 100) / 100]);
    draw(); updateButtons();
    if (state.clicks.length === 4) segment();
  }

  function undoClick() {
    if (state.proposal && state.proposal.k === state.k) { state.proposal = null; renderOverlay(); }
    state.clicks.pop();
    state.segmentSeq++;
    draw(); updateButtons();
  }

  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || !state.geo) return;
    canvas.setPointerCapture(ev.pointerId);
    drag = { x: ev.clientX, y: ev.clientY, ww: state.ww, wl: state.wl, moved: false };
  });

  canvas.addEventListener("pointermove", (ev) => {
    if (state.geo && state.slices.has(state.k)) {
      const [x, y] = eventImagePoint(ev);
      const xi = Math.round(x), yi = Math.round(y);
      if (xi >= 0 && yi >= 0 && xi < state.geo.columns && yi < state.geo.rows) {
        drawCorners(`x ${xi}  y ${yi}  ${state.slices.get(state.k)[yi * state.geo.columns + xi]} HU`);
      } else {
        drawCorners("");
      }
    }
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 4) return;
    drag.moved = true;
    state.ww = Math.max(1, drag.ww + dx * 4);
    state.wl = drag.wl + dy * 2;
    document.querySelectorAll(".preset").forEach((b) => b.classList.remove("active"));
    renderImage(); draw();
  });

  canvas.addEventListener("pointerup", (ev) => {
    if (!drag) return;
    const wasDrag = drag.moved;
    drag = null;
    if (wasDrag || ev.button !== 0) return;
    const pt = eventImagePoint(ev);
    if (insideImage(pt)) addClick(pt);
  });

  canvas.addEventListener("contextmenu", (ev) => { ev.preventDefault(); undoClick(); });

  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    wheelAcc += ev.deltaY;
    if (Math.abs(wheelAcc) < 40) return;
    const step = Math.sign(wheelAcc);
    wheelAcc = 0;
    goToSlice(state.k + step);
  }, { passive: false });

  document.addEventListener("keydown", (ev) => {
    const inLabel = ev.target === $("label-input");
    if (inLabel) {
      if (ev.key === "Enter") { ev.preventDefault(); $("label-input").blur(); accept(); }
      if (ev.key === "Escape") $("label-input").blur();
      return;
    }
    if (ev.target instanceof HTMLInputElement && ev.target.type === "text") return;
    if (!state.geo) return;
    const keys = {
      ArrowDown: () => goToSlice(state.k + 1),
      ArrowUp: () => goToSlice(state.k - 1),
      PageDown: () => goToSlice(state.k + 10),
      PageUp: () => goToSlice(state.k - 10),
      Home: () => goToSlice(0),
      End: () => goToSlice(state.geo.num_slices - 1),
      Backspace: undoClick,
      Escape: () => { state.clicks = []; state.proposal = null; state.segmentSeq++; renderOverlay(); draw(); updateButtons(); },
      Enter: accept,
      "]": () => propagate(+1),
      "[": () => propagate(-1),
      "1": () => setPreset("soft"),
      "2": () => setPreset("lung"),
      "3": () => setPreset("bone"),
      Delete: () => { if (state.selected) deleteObject(state.selected); },
      l: () => $("label-input").focus(),
    };
    const action = keys[ev.key];
    if (action) { ev.preventDefault(); action(); }
  });

  $("slice-slider").addEventListener("input", (ev) => goToSlice(parseInt(ev.target.value, 10)));
  $("accept-btn").addEventListener("click", accept);
  $("prop-next-btn").addEventListener("click", () => propagate(+1));
  $("prop-prev-btn").addEventListener("click", () => propagate(-1));
  $("export-btn").addEventListener("click", exportAll);
  $("all-slices").addEventListener("change", renderObjects);
  $("label-input").addEventListener("input", () => $("label-input").classList.remove("invalid"));
  document.querySelectorAll(".preset").forEach((b) => b.addEventListener("click", () => setPreset(b.dataset.preset)));
  new ResizeObserver(() => { fit(); draw(); }).observe($("viewport"));

  // -------------------------------------------------------------------------------- start-up
  async function start() {
    document.body.dataset.busy = "0";
    setPreset("soft");
    busy(+1);
    try {
      state.series = await api("/series");
      state.labels = (await api("/labels")).labels;
      renderLabelOptions();
      renderSeries();
      status(state.series.length ? "Open a series on the left." : "No series found under --data.");
    } catch (e) {
      status("Cannot reach the server: " + e.message, "err");
    } finally {
      busy(-1);
    }
  }

  // a small handle for tests and scripts: image pixel -> page (CSS) coordinates
  window.cmdeploy = {
    state,
    imageToClient(x, y) {
      const rect = canvas.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const [cx, cy] = toCanvas(x, y);
      return [rect.left + cx / dpr, rect.top + cy / dpr];
    },
    openSeries,
  };
  start();
})();
