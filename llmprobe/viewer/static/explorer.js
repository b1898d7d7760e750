
(() => {
"use strict";
const LN2 = Math.LN2;
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = [[255, 255, 229], [254, 227, 145], [254, 153, 41], [204, 76, 2], [102, 37, 6]];
const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
// colour scales of the strip (and the lens grid: surprisal); values beyond a scale's ends get its end colours
const SCALES = {
  surprisal: {palette: PALETTE, min: 0, max: 10, ticks: [0, 2, 4, 6, 8, 10], unit: " bits"},
  entropy: {palette: PALETTE, min: 0, max: 10, ticks: [0, 2, 4, 6, 8, 10], unit: " bits"},
  kl: {palette: PALETTE, min: 0, max: 0.5, ticks: [0, 0.1, 0.2, 0.3, 0.4, 0.5], unit: " bits"},
  delta: {palette: DIVERGING, min: -0.5, max: 0.5, ticks: [-0.5, -0.25, 0, 0.25, 0.5], unit: " \u0394P"},
};
const MAX_LISTED = 500;
const api = window.llmprobeView = {timings: {}, state: null};

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
function s(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  setAttrs(node, attrs);
  if (text !== undefined) node.textContent = String(text);
  return node;
}
function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}
const KINDS = {f32: Float32Array, f64: Float64Array, u8: Uint8Array, u16: Uint16Array, u32: Uint32Array,
               i32: Int32Array};
async function decode(spec) {
  // base64 -> zlib (the browser's own DecompressionStream) -> bytes regrouped by significance -> typed array
  if (!spec) return null;
  const text = atob(spec.data);
  const packed = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) packed[i] = text.charCodeAt(i);
  const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
  const planes = new Uint8Array(await new Response(stream).arrayBuffer());
  const Kind = KINDS[spec.type], width = Kind.BYTES_PER_ELEMENT, n = planes.length / width;
  if (width === 1) return new Kind(planes.buffer);
  const bytes = new Uint8Array(planes.length);
  for (let b = 0; b < width; b++) {
    const offset = b * n;
    for (let i = 0; i < n; i++) bytes[i * width + b] = planes[offset + i];
  }
  return new Kind(bytes.buffer);
}
async function decodeAll(specs) {
  const names = Object.keys(specs).filter(name => specs[name] && typeof specs[name] === "object");
  const arrays = await Promise.all(names.map(name => decode(specs[name])));
  return Object.fromEntries(names.map((name, i) => [name, arrays[i]]));
}
function visible(token) {
  if (token === null || token === undefined) return "\u2205";
  return token.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
}
function pct(p) {
  if (!Number.isFinite(p)) return "\u2013";
  if (p >= 0.001) return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + " %";
  return p.toExponential(1);
}
function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits === undefined ? 3 : digits) : "\u2013"; }
function color(value, scale) {
  if (!Number.isFinite(value)) return null;
  const palette = scale.palette;
  const t = Math.min(Math.max((value - scale.min) / (scale.max - scale.min), 0), 1) * (palette.length - 1);
  const i = Math.min(Math.floor(t), palette.length - 2), f = t - i;
  const c = palette[i].map((v, j) => Math.round(v + f * (palette[i + 1][j] - v)));
  return {bg: `rgb(${c[0]}, ${c[1]}, ${c[2]})`, dark: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 160};
}
function paint(node, value, scale) {
  const c = color(value, scale || SCALES.surprisal);
  node.style.backgroundColor = c ? c.bg : "";
  node.classList.toggle("dark", !!(c && c.dark));
}

class Dataset {
  static async create(d) {
    const rows = await decodeAll(d.rows);
    const fit = d.fit ? await decodeAll(d.fit.marks) : null;
    const base = d.baseline ? await decodeAll(d.baseline.rows) : null;
    return new Dataset(d, rows, fit, base);
  }
  constructor(d, rows, fitColumns, base) {
    this.d = d;
    this.k = d.top_k;
    this.targets = d.targets || [];
    this.tokens = d.tokens;
    this.none = d.none;
    this.position = rows.position;
    this.token = rows.token;
    this.next = rows.next;
    this.nextLogprob = rows.next_logprob;
    this.nextRank = rows.next_rank;
    this.entropy = rows.entropy;
    this.generated = rows.generated;
    this.topk = rows.topk;
    this.topkLogprob = rows.topk_logprob;
    this.targetLogprob = rows.target_logprob || null;
    this.targetSeqLogprob = rows.target_seq_logprob || null;
    this.layers = d.layers;
    this.outputLayer = d.output_layer;
    // the baseline's predictions, row for row with the trace's (tokens and positions are the same)
    this.base = base ? {interventions: d.baseline.interventions, k: d.baseline.top_k,
                        targets: d.baseline.targets, topk: base.topk, topkLogprob: base.topk_logprob,
                        nextLogprob: base.next_logprob, nextRank: base.next_rank, entropy: base.entropy,
                        targetLogprob: base.target_logprob || null, targetSeqLogprob: base.target_seq_logprob || null,
                        klBits: base.kl_bits} : null;
    this.prompts = d.prompts.map((p, i) => ({
      index: i, id: p.id, meta: p.meta, marks: new Map(p.marks.map(m => [m[0], m[1]])),
      slices: p.slices.map(x => ({start: x[0], count: x[1], layer: x[2]})),
      text: null,
    }));
    this.fit = d.fit;
    this.fitMarks = new Map();
    this.sequences = new Map();
    if (d.fit) {
      const c = fitColumns, K = d.fit.categories.length;
      const cut = (array, i) => Array.from(array.subarray(i * K, (i + 1) * K), v => Number.isNaN(v) ? null : v);
      for (let i = 0; i < d.fit.marks.count; i++) {
        const m = {prompt: c.prompt[i], position: c.position[i], n: c.n[i], sequence: d.fit.sequences[c.sequence[i]],
                   used: c.used[i] === 1, mass: c.mass[i], tv: c.tv[i], kl_bits: c.kl_bits[i],
                   model_prob: cut(c.model_prob, i), bayes_prob: cut(c.bayes_prob, i), theta: cut(c.theta, i),
                   count: cut(c.counts, i), baseline_prob: c.baseline_prob ? cut(c.baseline_prob, i) : null};
        this.fitMarks.set(m.prompt + ":" + m.position, m);
        if (!this.sequences.has(m.sequence)) this.sequences.set(m.sequence, []);
        this.sequences.get(m.sequence).push(m);
      }
      for (const list of this.sequences.values()) list.sort((a, b) => a.n - b.n || a.prompt - b.prompt);
    }
  }
  str(i) { return i === this.none ? null : this.tokens[i]; }
  slice(prompt, layer) {
    const slices = this.prompts[prompt].slices;
    return slices.find(x => x.layer === layer) || slices.find(x => x.layer === this.outputLayer) || slices[0];
  }
  text(prompt) {
    const p = this.prompts[prompt];
    if (p.text === null) {
      const sl = this.slice(prompt, this.outputLayer);
      let out = "";
      for (let r = sl.start; r < sl.start + sl.count; r++) out += this.tokens[this.token[r]];
      p.text = out;
    }
    return p.text;
  }
  prob(logprob) { return Math.exp(logprob); }
}

let data = null;
const state = api.state = {prompt: 0, layer: null, index: 0, color: "surprisal"};
const ui = {};

function build(root) {
  root.replaceChildren();
  ui.search = h("input", {type: "search", id: "prompt-search", placeholder: "search prompts by id or text",
                          "aria-label": "search prompts by id or text", autocomplete: "off"});
  ui.list = h("select", {id: "prompt-select", size: 6, "aria-label": "prompts"});
  ui.count = h("span", {id: "prompt-count", class: "muted"});
  ui.prev = h("button", {type: "button", id: "prompt-prev", title: "previous prompt"}, "\u25c0");
  ui.nextPrompt = h("button", {type: "button", id: "prompt-next", title: "next prompt"}, "\u25b6");
  ui.colorBy = h("select", {id: "color-by", "aria-label": "colour tokens by"},
                 h("option", {value: "surprisal"}, "surprisal (how unexpected each token was)"),
                 h("option", {value: "entropy"}, "entropy (how uncertain the prediction after each token is)"),
                 data.base ? h("option", {value: "kl"},
                               "change: KL(baseline\u2016this trace) of the prediction after each token (lower bound)")
                   : null,
                 data.base ? h("option", {value: "delta"},
                               "change: each token's probability, this trace \u2212 baseline") : null);
  ui.legend = h("span", {class: "legend", id: "legend"});
  drawLegend();
  ui.strip = h("div", {id: "strip", class: "strip", role: "listbox", "aria-label": "tokens"});
  ui.promptInfo = h("div", {id: "prompt-info", class: "muted"});
  ui.lens = h("section", {id: "lens", class: "panel", hidden: true});
  ui.detail = h("section", {id: "detail", class: data.base ? "panel wide" : "panel", "aria-live": "polite"});
  ui.fit = h("section", {id: "fit-panel", class: "panel", hidden: true});
  const run = data.d.run || {};
  const summary = [run.model, run.dtype, run.device, `top-${data.k}`,
                   data.targets.length ? `targets ${data.targets.map(t => JSON.stringify(t)).join(", ")}` : null,
                   `${data.prompts.length} prompts`, `${data.d.rows.count} rows`].filter(x => x);
  root.append(
    h("details", {id: "run", class: "muted"}, h("summary", null, summary.join(" \u00b7 ")),
      h("pre", {id: "run-meta"}, JSON.stringify(run, null, 1))),
    h("section", {id: "picker", class: "picker"},
      h("div", {class: "row"}, ui.search, ui.prev, ui.nextPrompt, ui.count), ui.list),
    h("div", {class: "row tools"}, h("label", null, "colour by ", ui.colorBy), ui.legend,
      h("span", {class: "muted"}, "\u2190/\u2192 move \u00b7 Home/End \u00b7 \u25c6 mark \u00b7 \u2016 generated")),
    ui.strip, ui.promptInfo, ui.lens,
    h("div", {class: "panels"}, ui.detail, ui.fit));
  ui.search.addEventListener("input", () => fillList());
  ui.list.addEventListener("change", () => { if (ui.list.value !== "") selectPrompt(Number(ui.list.value)); });
  ui.prev.addEventListener("click", () => selectPrompt(Math.max(0, state.prompt - 1)));
  ui.nextPrompt.addEventListener("click", () => selectPrompt(Math.min(data.prompts.length - 1, state.prompt + 1)));
  ui.colorBy.addEventListener("change", () => { state.color = ui.colorBy.value; drawLegend(); paintStrip(); });
  ui.strip.addEventListener("click", event => {
    const node = event.target.closest("[data-position]");
    if (node) selectIndex(Number(node.dataset.index));
  });
}

function drawLegend() {
  const scale = SCALES[state.color];
  const cells = scale.ticks.map((tick, i) => {
    const last = i === scale.ticks.length - 1;
    const text = (last ? "\u2265" : i === 0 && scale.min < 0 ? "\u2264" : "") + String(tick);
    const cell = h("span", {class: "swatch"}, text);
    paint(cell, tick, scale);
    return cell;
  });
  ui.legend.replaceChildren(...cells, scale.unit);
}

function fillList() {
  const query = ui.search.value.trim().toLowerCase();
  const options = [];
  let matched = 0;
  for (const p of data.prompts) {
    if (query && !p.id.toLowerCase().includes(query) && !data.text(p.index).toLowerCase().includes(query)) continue;
    matched++;
    if (options.length < MAX_LISTED) {
      const text = data.text(p.index).replace(/\s+/g, " ").slice(0, 120);
      options.push(h("option", {value: p.index}, `${p.id} \u2014 ${text}`));
    }
  }
  ui.list.replaceChildren(...options);
  ui.list.value = String(state.prompt);
  ui.count.textContent = `${matched} of ${data.prompts.length} prompts` +
    (matched > MAX_LISTED ? ` (first ${MAX_LISTED} listed)` : "");
}

function currentSlice() { return data.slice(state.prompt, state.layer); }

function selectPrompt(index) {
  state.prompt = index;
  if (ui.list.value !== String(index)) ui.list.value = String(index);
  const p = data.prompts[index];
  ui.promptInfo.replaceChildren();
  const info = [`prompt ${p.id}`, `${currentSlice().count} positions`];
  if (p.marks.size) info.push(`${p.marks.size} marks`);
  ui.promptInfo.append(info.join(" \u00b7 "));
  if (p.meta !== null && p.meta !== undefined) {
    ui.promptInfo.append(h("details", {class: "meta"}, h("summary", null, "fields"),
                           h("pre", {id: "prompt-meta"}, JSON.stringify(p.meta, null, 1))));
  }
  drawStrip();
  drawLens();
  selectIndex(0);
}

function drawStrip() {
  const p = data.prompts[state.prompt];
  const sl = currentSlice();
  ui.strip.setAttribute("data-prompt-id", p.id);
  const nodes = [];
  let inGenerated = false;
  for (let i = 0; i < sl.count; i++) {
    const r = sl.start + i, position = data.position[r];
    if (data.generated[r] && !inGenerated) {
      inGenerated = true;
      nodes.push(h("span", {class: "sep", "aria-hidden": "true"}, "\u2016"));
    }
    const mark = p.marks.get(position);
    nodes.push(h("span", {class: "tok" + (mark !== undefined ? " mark" : "") + (data.generated[r] ? " gen" : ""),
                          "data-position": position, "data-index": i, role: "option",
                          title: `position ${position}`}, visible(data.str(data.token[r]))));
  }
  ui.strip.replaceChildren(...nodes);
  ui.tokenNodes = nodes.filter(n => n.classList.contains("tok"));
  paintStrip();
}

function paintStrip() {
  // each token: how unexpected it was (row before it), or the prediction after it (its own row)
  const sl = currentSlice(), scale = SCALES[state.color], base = data.base;
  for (let i = 0; i < sl.count; i++) {
    const r = sl.start + i;
    let value = NaN;
    if (state.color === "entropy") value = data.entropy[r] / LN2;
    else if (state.color === "kl") value = base.klBits[r];
    else if (i === 0) value = NaN;
    else if (state.color === "delta") value = Math.exp(data.nextLogprob[r - 1]) - Math.exp(base.nextLogprob[r - 1]);
    else value = -data.nextLogprob[r - 1] / LN2;
    paint(ui.tokenNodes[i], value, scale);
  }
}

function selectIndex(index) {
  const started = performance.now();
  const sl = currentSlice();
  index = Math.max(0, Math.min(sl.count - 1, index));
  const old = ui.tokenNodes[state.index];
  if (old) { old.classList.remove("selected"); old.removeAttribute("aria-selected"); }
  state.index = index;
  const node = ui.tokenNodes[index];
  node.classList.add("selected");
  node.setAttribute("aria-selected", "true");
  if (node.scrollIntoView && !isVisible(node)) node.scrollIntoView({block: "nearest", inline: "nearest"});
  drawDetail();
  drawFit();
  markLens();
  api.timings.lastSelect = performance.now() - started;
}
function isVisible(node) {
  const a = node.getBoundingClientRect(), b = ui.strip.getBoundingClientRect();
  return a.top >= b.top && a.bottom <= b.bottom;
}

function drawDetail() {
  const sl = currentSlice(), r = sl.start + state.index, position = data.position[r], base = data.base;
  const entropyBits = data.entropy[r] / LN2;
  const nextId = data.next[r];
  const nextToken = data.str(nextId);
  const nextProb = Math.exp(data.nextLogprob[r]);
  const rank = data.nextRank[r];
  const layerNote = data.layers ? ` \u00b7 layer ${sl.layer}${sl.layer === data.outputLayer ? " (output)" : ""}` : "";
  const heading = h("h2", null, `position ${position}: `, h("code", null, visible(data.str(data.token[r]))),
                    " \u2192 next ", h("code", null, visible(nextToken)), layerNote);
  const table = topkTable("topk", data.k, data.topk, data.topkLogprob, r, nextToken === null ? null : nextId, "data-prob");
  const parts = [heading];
  if (base) {
    const baseEntropy = base.entropy[r] / LN2, baseNext = Math.exp(base.nextLogprob[r]), kl = base.klBits[r];
    const theirs = topkTable("baseline-topk", base.k, base.topk, base.topkLogprob, r,
                             nextToken === null ? null : nextId, "data-baseline-prob");
    parts.push(h("p", {class: "facts"},
      "entropy ", h("b", {"data-baseline-entropy": String(baseEntropy), id: "baseline-entropy"},
                    `${fmt(baseEntropy)} bits`), " \u2192 ",
      h("b", {"data-entropy": String(entropyBits), id: "entropy"}, `${fmt(entropyBits)} bits`),
      " \u00b7 change KL(baseline\u2016this trace) \u2265 ",
      h("b", {"data-change-kl-bits": String(kl), id: "change-kl",
              title: "from the two top-k lists and the actual next token: a lower bound on the full KL"},
        `${fmt(kl, 4)} bits`)),
      h("p", {class: "facts"}, "next token ",
        nextToken === null ? h("span", {id: "next-token"}, "none (end of the text)") : h("span", null,
          h("code", null, visible(nextToken)), " p = ",
          h("span", {id: "baseline-next", "data-baseline-next-prob": String(baseNext),
                     "data-baseline-next-rank": String(base.nextRank[r])}, `${pct(baseNext)} (rank ${base.nextRank[r]})`),
          " \u2192 ",
          h("span", {id: "next-token", "data-next-prob": String(nextProb), "data-next-rank": String(rank)},
            `${pct(nextProb)} (rank ${rank})`),
          ", \u0394 = ", h("b", {id: "delta-next", "data-delta-next-prob": String(nextProb - baseNext)},
                            signed(nextProb - baseNext)))),
      h("div", {class: "pair"},
        h("div", null, h("h3", null, "baseline ", h("span", {class: "muted"}, base.interventions || "no intervention")),
          theirs),
        h("div", null, h("h3", null, "this trace ", h("span", {class: "muted"}, data.d.interventions || "no intervention")),
          table)));
  } else {
    parts.push(h("p", {class: "facts"},
      "entropy ", h("b", {"data-entropy": String(entropyBits), id: "entropy"}, `${fmt(entropyBits)} bits`),
      " \u00b7 next token ",
      nextToken === null ? h("span", {id: "next-token"}, "none (end of the text)")
        : h("span", {id: "next-token", "data-next-prob": String(nextProb), "data-next-rank": String(rank)},
            h("code", null, visible(nextToken)), ` p = ${pct(nextProb)}, rank ${rank}`)), table);
  }
  if (data.targets.length && data.targetLogprob) {
    const T = data.targets.length, both = base && base.targets && base.targetLogprob;
    const trows = data.targets.map((text, t) => {
      const first = Math.exp(data.targetLogprob[r * T + t]);
      const whole = data.targetSeqLogprob ? Math.exp(data.targetSeqLogprob[r * T + t]) : NaN;
      const theirs = both ? Math.exp(base.targetLogprob[r * T + t]) : NaN;
      const theirsWhole = both && base.targetSeqLogprob ? Math.exp(base.targetSeqLogprob[r * T + t]) : NaN;
      return h("tr", {"data-target": text, "data-prob": String(first),
                      "data-seq-prob": Number.isFinite(whole) ? String(whole) : null,
                      "data-baseline-prob": both ? String(theirs) : null,
                      "data-baseline-seq-prob": Number.isFinite(theirsWhole) ? String(theirsWhole) : null},
        h("td", null, h("code", null, visible(text))), both ? h("td", {class: "num"}, pct(theirs)) : null,
        h("td", {class: "num"}, pct(first)),
        both ? h("td", {class: "num"}, Number.isFinite(theirsWhole) ? pct(theirsWhole) : "\u2013") : null,
        h("td", {class: "num"}, Number.isFinite(whole) ? pct(whole) : "\u2013"));
    });
    const column = (name, baseline) => h("th", null, both ? `${name}, ${baseline ? "baseline" : "this trace"}` : name);
    parts.push(h("table", {id: "targets", class: "plain"},
      h("thead", null, h("tr", null, h("th", null, "target"), both ? column("first token", true) : null,
                                     column("first token", false),
                                     both ? column("whole string (at marks)", true) : null,
                                     column("whole string (at marks)", false))),
      h("tbody", null, ...trows)));
  }
  const mark = data.prompts[state.prompt].marks.get(position);
  if (mark !== undefined && sl.layer === (data.layers ? data.outputLayer : null)) {
    parts.push(h("p", {class: "muted", id: "mark-fields"}, "mark: ", JSON.stringify(mark)));
  }
  ui.detail.replaceChildren(...parts);
}

function topkTable(id, k, topk, logprob, r, nextId, probAttribute) {
  // one model's top-k at row r as bars; probAttribute carries exp(log-probability) at full precision
  const rows = [];
  for (let j = 0; j < k; j++) {
    const idx = topk[r * k + j];
    const token = data.str(idx);
    const prob = Math.exp(logprob[r * k + j]);
    const bar = h("span", {class: "bar"});
    bar.style.width = (100 * prob).toFixed(2) + "%";
    rows.push(h("tr", {"data-token": token, [probAttribute]: String(prob), "data-rank": j + 1,
                       class: idx === nextId ? "actual" : null},
      h("td", {class: "num muted"}, j + 1), h("td", {class: "tokcell"}, h("code", null, visible(token))),
      h("td", {class: "barcell"}, bar), h("td", {class: "num"}, pct(prob))));
  }
  return h("table", {id, class: "bars"},
    h("thead", null, h("tr", null, h("th", null, "#"), h("th", null, `top-${k} next token`),
                                   h("th", null, "probability"), h("th", null, ""))),
    h("tbody", null, ...rows));
}
function signed(p) {
  // a change of probability in percentage points
  if (!Number.isFinite(p)) return "\u2013";
  return (p > 0 ? "+" : p < 0 ? "\u2212" : "\u00b1") + (100 * Math.abs(p)).toPrecision(2) + " pp";
}

function drawFit() {
  if (!data.fit) { ui.fit.hidden = true; return; }
  ui.fit.hidden = false;
  const fit = data.fit, cats = fit.categories;
  const sl = currentSlice(), position = data.position[sl.start + state.index];
  const mark = data.fitMarks.get(state.prompt + ":" + position);
  const parts = [h("h2", null, "model vs Bayesian posterior predictive")];
  if (mark) {
    const theta = mark.theta && mark.theta.every(v => v !== null) ? mark.theta : null;
    parts.push(h("p", {class: "facts"},
      `n = ${mark.n} examples`, mark.count ? ` (${cats.map((c, i) => `${c} ${mark.count[i]}`).join(", ")})` : "",
      " \u00b7 KL(Bayes\u2016model) ", h("b", {"data-kl-bits": String(mark.kl_bits), id: "kl-bits"},
                                           `${fmt(mark.kl_bits, 4)} bits`),
      ` \u00b7 TV ${fmt(mark.tv, 4)} \u00b7 mass on the categories ${pct(mark.mass)}`,
      mark.used ? "" : h("span", {class: "warn"}, " \u00b7 left out of the fit (mass below --min-mass)")));
    const baseline = mark.baseline_prob;  // the baseline trace's distribution at this mark, when given
    const rows = cats.map((c, i) => {
      const model = mark.model_prob[i], bayes = mark.bayes_prob[i];
      const mb = h("span", {class: "bar model"}), bb = h("span", {class: "bar bayes"});
      mb.style.width = (100 * model).toFixed(2) + "%";
      bb.style.width = (100 * bayes).toFixed(2) + "%";
      let base = null;
      if (baseline) {
        base = h("span", {class: "bar baseline"});
        base.style.width = (100 * (baseline[i] || 0)).toFixed(2) + "%";
      }
      return h("tr", {"data-category": c, "data-model-prob": String(model), "data-bayes-prob": String(bayes),
                      "data-theta": theta ? String(theta[i]) : null,
                      "data-baseline-prob": baseline && baseline[i] !== null ? String(baseline[i]) : null},
        h("td", null, c), baseline ? h("td", {class: "num"}, pct(baseline[i] === null ? NaN : baseline[i])) : null,
        h("td", {class: "num"}, pct(model)), h("td", {class: "num"}, pct(bayes)),
        h("td", {class: "num"}, theta ? pct(theta[i]) : "\u2013"),
        h("td", {class: "barcell"}, base, mb, bb));
    });
    parts.push(h("table", {id: "posterior", class: "bars"},
      h("thead", null, h("tr", null, h("th", null, "category"), baseline ? h("th", null, "baseline") : null,
                                     h("th", null, baseline ? "this trace" : "model"), h("th", null, "Bayes"),
                                     h("th", null, "\u03b8"), h("th", null, ""))),
      h("tbody", null, ...rows)));
  } else {
    parts.push(h("p", {class: "muted", id: "fit-none"},
      `position ${position} is not a mark of the fit; marks are flagged \u25c6 in the strip.`));
  }
  const sequence = mark ? mark.sequence : firstSequence(state.prompt);
  if (sequence !== null) parts.push(chart(sequence, mark));
  ui.fit.replaceChildren(...parts);
}
function firstSequence(prompt) {
  for (const m of data.fitMarks.values()) if (m.prompt === prompt) return m.sequence;
  return null;
}

function chart(sequence, current) {
  const marks = data.sequences.get(sequence) || [];
  const cats = data.fit.categories;
  const shown = cats.length === 2 ? [0] : cats.map((_, i) => i);
  const W = 460, H = 230, L = 44, R = 12, T = 14, B = 34;
  const nMin = Math.min(...marks.map(m => m.n)), nMax = Math.max(...marks.map(m => m.n));
  const x = n => L + (nMax > nMin ? (n - nMin) / (nMax - nMin) : 0.5) * (W - L - R);
  const y = p => T + (1 - p) * (H - T - B);
  const svg = s("svg", {id: "fit-chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                        "aria-label": `P(category) against n for sequence ${sequence}`});
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(s("line", {x1: L, x2: W - R, y1: y(tick), y2: y(tick), class: "grid"}));
    svg.append(s("text", {x: L - 6, y: y(tick) + 4, "text-anchor": "end", class: "axis"}, tick));
  }
  const step = Math.max(1, Math.ceil((nMax - nMin) / 10));
  for (let n = nMin; n <= nMax; n += step) {
    svg.append(s("text", {x: x(n), y: H - B + 16, "text-anchor": "middle", class: "axis"}, n));
  }
  svg.append(s("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis"},
               "n (examples in context)"));
  const colors = ["#1f4e9c", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#4d7c0f", "#a16207"];
  shown.forEach((c, k) => {
    const color = colors[k % colors.length];
    const series = (key, cls) => marks.filter(m => m[key] && m[key][c] !== null)
      .map(m => `${x(m.n).toFixed(1)},${y(m[key][c]).toFixed(1)}`).join(" ");
    svg.append(s("polyline", {points: series("theta", "theta"), class: "theta", stroke: color}));
    svg.append(s("polyline", {points: series("bayes_prob"), class: "bayes", stroke: color}));
    if (data.fit.baseline) svg.append(s("polyline", {points: series("baseline_prob"), class: "baseline", stroke: color}));
    svg.append(s("polyline", {points: series("model_prob"), class: "model", stroke: color}));
    for (const m of marks) {
      const dot = s("circle", {cx: x(m.n), cy: y(m.model_prob[c]), r: m === current ? 5 : 3, fill: m.used ? color : "white",
                               stroke: color, class: "point" + (m === current ? " current" : ""),
                               "data-n": m.n, "data-prompt": m.prompt, "data-position": m.position});
      dot.append(s("title", null, `n = ${m.n}: model ${pct(m.model_prob[c])}, Bayes ${pct(m.bayes_prob[c])}`));
      dot.addEventListener("click", () => jumpTo(m.prompt, m.position));
      svg.append(dot);
    }
  });
  if (current) svg.append(s("line", {x1: x(current.n), x2: x(current.n), y1: T, y2: H - B, class: "now"}));
  const what = cats.length === 2 ? `P(${cats[0]})` : "P(category)";
  const key = h("p", {class: "muted chart-key"},
    `${what} in sequence ${sequence}: model (solid, dots; hollow: left out of the fit), Bayesian posterior `
    + "predictive (dashed), \u03b8 (dotted)" + (data.fit.baseline ? ", the baseline trace (faint)" : ""),
    cats.length > 2 ? h("span", null, " \u2014 ",
      ...shown.map((c, k) => h("span", {class: "swatch-text", "data-color": k}, `${cats[c]} `))) : null);
  if (cats.length > 2) {
    key.querySelectorAll(".swatch-text").forEach(node => { node.style.color = colors[Number(node.dataset.color)]; });
  }
  return h("figure", {class: "chart"}, svg, key);
}

function jumpTo(prompt, position) {
  if (prompt !== state.prompt) selectPrompt(prompt);
  const sl = currentSlice();
  for (let i = 0; i < sl.count; i++) if (data.position[sl.start + i] === position) { selectIndex(i); return; }
}

function drawLens() {
  if (!data.layers) { ui.lens.hidden = true; return; }
  ui.lens.hidden = false;
  const layers = data.layers;
  const slider = h("input", {type: "range", id: "layer-slider", min: 0, max: layers.length - 1, step: 1,
                             value: Math.max(0, layers.indexOf(state.layer)), "aria-label": "layer"});
  const label = h("span", {id: "layer-label"});
  const p = data.prompts[state.prompt];
  const out = data.slice(state.prompt, data.outputLayer);
  const head = h("tr", null, h("th", null, "layer"));
  for (let i = 0; i < out.count; i++) head.append(h("th", {"data-position": data.position[out.start + i]},
                                                       visible(data.str(data.token[out.start + i]))));
  const body = [];
  for (const layer of [...layers].reverse()) {
    const sl = p.slices.find(x => x.layer === layer);
    const row = h("tr", {"data-layer": layer}, h("th", null, layer === data.outputLayer ? `${layer} (out)` : layer));
    for (let i = 0; sl && i < sl.count; i++) {
      const r = sl.start + i;
      const prob = Math.exp(data.topkLogprob[r * data.k]);
      const cell = h("td", {"data-layer": layer, "data-position": data.position[r], "data-index": i,
                            title: `layer ${layer}, position ${data.position[r]}: ${pct(prob)}`},
                     visible(data.str(data.topk[r * data.k])));
      paint(cell, -Math.log2(Math.max(prob, 1e-12)));
      row.append(cell);
    }
    body.push(row);
  }
  const grid = h("table", {id: "lens-grid", class: "grid"}, h("thead", null, head), h("tbody", null, ...body));
  grid.addEventListener("click", event => {
    const cell = event.target.closest("td[data-layer]");
    if (!cell) return;
    setLayer(Number(cell.dataset.layer));
    selectIndex(Number(cell.dataset.index));
  });
  slider.addEventListener("input", () => { setLayer(layers[Number(slider.value)]); });
  ui.slider = slider; ui.layerLabel = label; ui.grid = grid;
  ui.lens.replaceChildren(h("h2", null, "logit lens: top-1 next token by layer"),
    h("div", {class: "row"}, h("label", null, "layer ", slider), label,
      h("span", {class: "muted"}, "\u2191/\u2193 change layer \u00b7 cells coloured by -log\u2082 P(top-1)")),
    h("div", {class: "gridwrap"}, grid));
  markLens();
}

function setLayer(layer) {
  if (layer === state.layer) return;
  state.layer = layer;
  const index = state.index;
  drawStrip();
  state.index = Math.min(index, currentSlice().count - 1);
  selectIndex(state.index);
}

function markLens() {
  if (!data.layers || !ui.grid) return;
  const layers = data.layers;
  ui.slider.value = String(Math.max(0, layers.indexOf(state.layer)));
  ui.layerLabel.textContent = `${state.layer}${state.layer === data.outputLayer ? " (output)" : ""} of `
    + `${layers[0]}\u2013${layers[layers.length - 1]}`;
  const position = data.position[currentSlice().start + state.index];
  ui.grid.querySelectorAll(".on").forEach(n => n.classList.remove("on"));
  ui.grid.querySelectorAll(`tr[data-layer="${state.layer}"], [data-position="${position}"]`)
    .forEach(n => n.classList.add("on"));
}

function onKey(event) {
  if (!data || event.altKey || event.ctrlKey || event.metaKey) return;
  const target = event.target;
  const tag = target && target.tagName;
  if (tag === "TEXTAREA" || (tag === "INPUT" && target.type !== "range" && target.type !== "button")) return;
  const inList = tag === "SELECT" || (tag === "INPUT" && target.type === "range");
  const moves = {ArrowLeft: -1, ArrowRight: 1};
  if (event.key in moves) selectIndex(state.index + moves[event.key]);
  else if (event.key === "Home" && !inList) selectIndex(0);
  else if (event.key === "End" && !inList) selectIndex(currentSlice().count - 1);
  else if ((event.key === "ArrowUp" || event.key === "ArrowDown") && data.layers && !inList) {
    const i = data.layers.indexOf(state.layer) + (event.key === "ArrowUp" ? 1 : -1);
    if (i >= 0 && i < data.layers.length) setLayer(data.layers[i]);
  } else return;
  event.preventDefault();
}

async function load(raw, root) {
  data = await Dataset.create(raw);
  state.color = "surprisal";
  build(root);
  state.prompt = 0;
  state.index = 0;
  state.layer = data.layers ? data.outputLayer : null;
  fillList();
  selectPrompt(0);
}

function live(config, root) {
  const limits = config.limits;
  const prompt = h("textarea", {id: "probe-prompt", rows: 4, maxlength: limits.max_prompt_chars,
                                placeholder: "type a prompt", "aria-label": "prompt", required: true});
  const targets = h("input", {type: "text", id: "probe-targets", placeholder: "targets, comma-separated: \u2423heads,\u2423tails",
                              "aria-label": "targets (comma-separated)"});
  const tokens = h("input", {type: "number", id: "probe-new-tokens", min: 0, max: limits.max_new_tokens, value: 0,
                             "aria-label": "tokens to generate"});
  const run = h("button", {type: "submit", id: "probe-run"}, "trace");
  const status = h("span", {id: "probe-status", class: "muted", "aria-live": "polite"});
  const error = h("p", {id: "probe-error", class: "error", role: "alert", hidden: true});
  const download = h("a", {id: "probe-download", hidden: true, download: ""}, "download this trace (Parquet)");
  const form = h("form", {id: "probe-form", class: "probe"},
    h("label", {class: "wide"}, "prompt", prompt),
    h("div", {class: "row"}, h("label", null, "targets ", targets), h("label", null, "generate ", tokens, " tokens"),
      run, status, download), error,
    h("p", {class: "muted"}, `model ${config.model} \u00b7 top-${config.top_k} \u00b7 at most `
      + `${limits.max_prompt_chars} characters and ${limits.max_new_tokens} generated tokens \u00b7 `
      + "targets as in llmprobe trace --targets (spaces kept)"));
  const explorer = h("div", {id: "explorer"});
  root.replaceChildren(form, explorer);
  let sent = 0;
  form.addEventListener("submit", async event => {
    event.preventDefault();
    const mine = ++sent;
    error.hidden = true;
    status.textContent = "tracing\u2026";
    const body = {prompt: prompt.value, targets: targets.value, max_new_tokens: Number(tokens.value || 0)};
    let answer, ok = false;
    try {
      const response = await fetch("api/trace", {method: "POST", headers: {"Content-Type": "application/json"},
                                                 body: JSON.stringify(body)});
      ok = response.ok;
      answer = await response.json();
    } catch (exc) {
      answer = {error: `no answer from the server (${exc})`};
    }
    if (mine !== sent) return;  // a newer request was sent meanwhile: it will be shown
    if (!ok || answer.error) {
      status.textContent = "";
      error.textContent = answer && answer.error ? answer.error : "the server refused the request";
      error.hidden = false;
      return;
    }
    status.textContent = `traced in ${Number(answer.seconds).toFixed(2)} s`;
    download.href = "api/trace/" + Number(answer.id) + ".parquet";
    download.hidden = false;
    const started = performance.now();
    await load(answer.data, explorer);
    api.timings.render = performance.now() - started;
  });
}

document.addEventListener("keydown", onKey);
api.selectPrompt = i => selectPrompt(i);
api.selectPosition = position => jumpTo(state.prompt, position);
async function main() {
  const raw = JSON.parse(document.getElementById("llmprobe-data").textContent);
  const root = document.getElementById("app");
  if (typeof DecompressionStream === "undefined") {
    root.replaceChildren(h("p", {class: "error"}, "This browser is too old for this page (it has no DecompressionStream)."));
    return;
  }
  if (raw.live) live(raw.live, root);
  else await load(raw, root);
  api.timings.ready = performance.now();
}
main().catch(exc => {
  document.getElementById("app").replaceChildren(h("p", {class: "error"}, `The page could not be drawn: ${exc}`));
});
})();
