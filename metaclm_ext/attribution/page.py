"""The attribution as one self-contained HTML page: the text's tokens, and for the clicked one the training
tokens each layer and module retrieves (top-k and last-k, with their text, scores and articles).

Nothing is fetched: the CSS and the script are inline and the result is embedded as JSON in a
``<script type="application/json" id="attribution">`` element. ``page.html#pos=N`` opens with token N
selected (how the headless-browser screenshot picks one), ``#pos=N&layer=L`` showing the layers from L on.
"""
from __future__ import annotations

import html
import json

DATA_ID = "attribution"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { padding: 12px 20px; background: #fff; border-bottom: 1px solid #ddd; }
header h1 { font-size: 17px; margin: 0 0 4px; }
header p { margin: 2px 0; color: #555; font-size: 12.5px; }
#text { padding: 14px 20px; background: #fff; border-bottom: 1px solid #ddd; font-size: 17px; line-height: 2; }
.tok { cursor: pointer; padding: 2px 1px; border-radius: 3px; white-space: pre; }
.tok.off { color: #aaa; cursor: default; }
.tok:hover { background: #e3ecff; }
.tok.sel { background: #2a5bd7; color: #fff; }
#panel { padding: 12px 20px; }
#panel h2 { font-size: 15px; margin: 4px 0 10px; }
.layer { display: flex; gap: 12px; margin-bottom: 12px; }
.mod { flex: 1; min-width: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.mod h3 { font-size: 13px; margin: 0 0 4px; }
.share { color: #555; font-size: 12px; margin-bottom: 4px; }
.lists { display: flex; gap: 10px; }
.lists > div { flex: 1; min-width: 0; }
.lists h4 { font-size: 11.5px; margin: 4px 0 2px; color: #555; text-transform: uppercase; letter-spacing: .04em; }
ol { margin: 0; padding: 0; list-style: none; font-size: 12px; }
li { display: flex; align-items: baseline; margin: 1px 0; white-space: nowrap; }
.score { flex: 0 0 64px; color: #2a5bd7; font-variant-numeric: tabular-nums; }
/* The text before the token is right-aligned and clipped on its left, so the token always shows. */
.left { flex: 0 0 42%; display: flex; justify-content: flex-end; overflow: hidden; white-space: pre; color: #444; }
.rest { flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: pre; color: #444; }
.hit { background: #ffe08a; font-weight: 600; color: #000; }
.next { text-decoration: underline; color: #0a7a3b; }
.art { color: #888; margin-left: 6px; font-style: italic; }
.head { font-size: 11.5px; color: #555; margin-top: 6px; }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('""" + DATA_ID + """').textContent);
const attributed = new Set(data.positions);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x, digits) { return x === null ? 'n/a' : x.toFixed(digits); }
function entry(pair) {
  const row = data.rows[String(pair[0])];
  const li = el('li');
  li.title = 'row ' + pair[0] + ', step ' + row.step + ', sequence ' + row.sequence + ', position ' + row.position +
    (row.title !== null ? ', article: ' + row.title : '');
  li.appendChild(el('span', 'score', pair[1].toPrecision(3)));
  const left = el('span', 'left');
  left.appendChild(el('span', null, row.left));
  li.appendChild(left);
  const rest = el('span', 'rest');
  rest.appendChild(el('span', 'hit', row.token));
  rest.appendChild(el('span', 'next', row.next));
  rest.appendChild(document.createTextNode(row.right.slice(row.next.length)));
  if (row.title !== null) rest.appendChild(el('span', 'art', row.title));
  li.appendChild(rest);
  return li;
}
function selection(title, pairs) {
  const d = el('div');
  d.appendChild(el('h4', null, title));
  const ol = el('ol');
  pairs.forEach(p => ol.appendChild(entry(p)));
  d.appendChild(ol);
  return d;
}
function moduleBox(m, heads) {
  const box = el('div', 'mod');
  box.appendChild(el('h3', null, (m.role === 'attn' ? 'attention o_proj' : 'FFN down_proj') + '  (' + m.module + ')'));
  heads.forEach((h, i) => {
    if (heads.length > 1) box.appendChild(el('div', 'head', 'head ' + i));
    box.appendChild(el('div', 'share', 'top-' + data.k + ' carry ||C_S||/||C|| = ' + fmt(h.top_share.ratio, 3) +
      ' (cos ' + fmt(h.top_share.cosine, 2) + '); last-' + data.k + ' ' + fmt(h.last_share.ratio, 3) +
      ' (cos ' + fmt(h.last_share.cosine, 2) + ')'));
    const lists = el('div', 'lists');
    lists.appendChild(selection('top ' + data.k + ' by w_t', h.top));
    lists.appendChild(selection('last ' + data.k, h.last));
    box.appendChild(lists);
  });
  return box;
}
function show(p, fromLayer) {
  document.querySelectorAll('.tok').forEach(t => t.classList.toggle('sel', Number(t.dataset.pos) === p));
  const panel = document.getElementById('panel');
  panel.replaceChildren();
  const tok = data.tokens[p];
  panel.appendChild(el('h2', null, 'position ' + p + ': ' + JSON.stringify(tok.text) +
    (p + 1 < data.tokens.length ? '  (next: ' + JSON.stringify(data.tokens[p + 1].text) + ')' : '')));
  const result = data.results[String(p)];
  const layers = [...new Set(data.modules.map(m => m.layer))].filter(l => l >= fromLayer);
  if (fromLayer > 0) panel.appendChild(el('div', 'share', 'layers from ' + fromLayer + ' (click a token for all)'));
  layers.forEach(layer => {
    const row = el('div', 'layer');
    row.appendChild(el('div', 'share', 'layer ' + layer));
    data.modules.filter(m => m.layer === layer).forEach(m => row.appendChild(moduleBox(m, result[m.key])));
    document.getElementById('panel').appendChild(row);
  });
}
const text = document.getElementById('text');
data.tokens.forEach(t => {
  const s = el('span', attributed.has(t.position) ? 'tok' : 'tok off', t.text);
  s.dataset.pos = t.position;
  if (attributed.has(t.position)) s.addEventListener('click', () => { location.hash = 'pos=' + t.position; });
  text.appendChild(s);
});
function fromHash() {
  const m = /pos=(-?\\d+)/.exec(location.hash);
  const p = m ? Number(m[1]) : data.positions[0];
  const layer = /layer=(\\d+)/.exec(location.hash);
  show(attributed.has(p) ? p : data.positions[0], layer ? Number(layer[1]) : 0);
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def embedded_json(result: dict) -> str:
    """``result`` as JSON that cannot end its <script> element early: <, > and & are \\u-escaped."""
    return (json.dumps(result, ensure_ascii=False, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def render_page(result: dict) -> str:
    """The self-contained HTML page of an attribution result (see :mod:`.attribute`)."""
    checkpoint = result["checkpoint"]
    model = (result.get("model") or {}).get("description", "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>metaclm attribute: {html.escape(result["text"][:60])}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>Which fine-tuning tokens does each layer retrieve?</h1>
<p>run {html.escape(result["run"])}; checkpoint step {checkpoint["step"]} ({checkpoint["rows"]:,} history rows);
{html.escape(model)}</p>
<p>Click a token. Per layer and module: the {result["k"]} fine-tuning tokens with the largest and smallest dual-form
weight w_t = &lt;x_t, x&gt; (highlighted: the token; underlined: the token it was trained to predict), and the
share of the module's fine-tuning contribution C = &Sigma;<sub>t</sub> e_t w_t they carry.</p>
</header>
<div id="text"></div>
<div id="panel"></div>
<script type="application/json" id="{DATA_ID}">{embedded_json(result)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""
