"""A static dashboard: a folder that opens from disk in any browser, offline, with no server.

    out/index.html          every exported latent in a table (density, mean, max, top tokens, promoted tokens,
                            and a flag on latents that fire only on massive-norm tokens), searchable and sortable;
                            its data and script are inline
    out/latents/<i>.html    one self-contained page per latent: its card, links to its neighbours, arrow keys step
    out/.saelab-dashboard.json   the files this dashboard consists of

Every file carries its own CSS (and the index its own small script); nothing is fetched, so the pages render the
same from file://, from a zip, or from any static host. One file per latent keeps each page small and fast.

A new dashboard may replace only the files a dashboard recorded writing there (as a cache may delete only its own
files): a folder holding anything else is refused before anything is written, and one process writes at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from saelab.errors import SaelabError
from saelab.explore.examples import EMPTY
from saelab.evals.core import MASSIVE
from saelab.explore.html import MASSIVE_NOTE, STYLE, esc, shown, top_tokens
from saelab.files import LOCK_FILE, FolderLock, remove_owned, write_atomic

INDEX = "index.html"
PAGES = "latents"
RECORD = ".saelab-dashboard.json"
"""The files of the dashboard written in a folder (relative names): what the next dashboard there may replace."""

PAGE_STYLE = """body{margin:16px 22px;font:13px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d1d1f}
nav{margin-bottom:10px}nav a{margin-right:14px}a{color:#0a58ca;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:19px;margin:0 0 4px}.meta{color:#555}input{font-size:14px;padding:4px 8px;width:340px;margin:10px 0}
table.index{border-collapse:collapse}table.index th{text-align:left;cursor:pointer;border-bottom:2px solid #ccc;
padding:3px 10px 3px 0;user-select:none}table.index td{padding:2px 10px 2px 0;border-bottom:1px solid #eee}
table.index td.n{text-align:right;font-variant-numeric:tabular-nums}.chip{background:#ffd9b3;border-radius:2px;
font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;margin-right:4px}"""

INDEX_SCRIPT = """
(function () {
  var rows = JSON.parse(document.getElementById('data').textContent);
  var body = document.getElementById('rows'), count = document.getElementById('count');
  var query = document.getElementById('q'), key = 1, descending = true, LIMIT = 500;
  var legend = (document.getElementById('legend') || {}).textContent || '';
  function cell(text, cls) { var td = document.createElement('td'); if (cls) td.className = cls; td.textContent = text; return td; }
  function tokens(list) {
    var td = document.createElement('td');
    list.forEach(function (t) { var s = document.createElement('span'); s.className = 'chip'; s.textContent = t; td.appendChild(s); });
    return td;
  }
  function fmt(x) { return x === 0 ? '0' : Number(x.toPrecision(3)).toString(); }
  function render() {
    var q = query.value.trim().toLowerCase();
    var shown = rows.filter(function (r) {
      if (!q) return true;
      if (/^[0-9]+$/.test(q)) return String(r[0]) === q;
      return r[4].concat(r[5]).some(function (t) { return t.toLowerCase().indexOf(q) >= 0; });
    });
    shown.sort(function (a, b) { var d = a[key] < b[key] ? -1 : a[key] > b[key] ? 1 : 0; return descending ? -d : d; });
    body.textContent = '';
    shown.slice(0, LIMIT).forEach(function (r) {
      var tr = document.createElement('tr'), td = document.createElement('td'), a = document.createElement('a');
      a.href = 'latents/' + r[0] + '.html'; a.textContent = r[0]; td.appendChild(a); tr.appendChild(td);
      tr.appendChild(cell((100 * r[1]).toPrecision(3) + '%', 'n'));
      tr.appendChild(cell(fmt(r[2]), 'n')); tr.appendChild(cell(fmt(r[3]), 'n'));
      tr.appendChild(tokens(r[4])); tr.appendChild(tokens(r[5]));
      if (legend) {  // the note column: a flag, or an empty cell
        var flag = cell(r.length > 6 ? '\u26a0 ' + r[6] : ''); flag.title = legend; flag.style.color = '#a00';
        tr.appendChild(flag);
      }
      body.appendChild(tr);
    });
    count.textContent = shown.length + ' of ' + rows.length + ' latents' + (shown.length > LIMIT ? ' (first ' + LIMIT + ' shown)' : '');
  }
  Array.prototype.forEach.call(document.querySelectorAll('th[data-key]'), function (th) {
    th.addEventListener('click', function () {
      var k = Number(th.getAttribute('data-key'));
      descending = k === key ? !descending : k !== 0; key = k; render();
    });
  });
  var given = new URLSearchParams(window.location.search).get('q');  // index.html?q=Monday opens a search
  if (given) query.value = given;
  query.addEventListener('input', render);
  render();
})();
"""

PAGE_SCRIPT = """
document.addEventListener('keydown', function (e) {
  var link = document.getElementById(e.key === 'ArrowLeft' ? 'prev' : e.key === 'ArrowRight' ? 'next' : '');
  if (link) window.location.href = link.getAttribute('href');
});
"""


def inline_json(data) -> str:
    """JSON safe inside a <script> element (no '</' can close it early)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def recorded_files(out: Path) -> set[str]:
    """The files the dashboard last written in `out` consists of, as its record lists them (none without one)."""
    try:
        files = json.loads((out / RECORD).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def check_folder(out: str | Path) -> set[str]:
    """The files in `out` a new dashboard may replace; refuses, naming one, a folder that holds anything else (a
    user's page, a folder, a link), so that no one's file is overwritten or deleted. Cheap: call it before a pass."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaelabError(f"{out} is a file, not a folder; choose another folder for the dashboard (--out)")
    owned = recorded_files(out) if out.is_dir() else set()
    ours = owned | {LOCK_FILE, RECORD, RECORD + ".tmp"}
    found = sorted(out.iterdir()) if out.is_dir() else []
    pages = out / PAGES
    if pages.is_dir() and not pages.is_symlink():
        found += sorted(pages.iterdir())

    def written(path: Path) -> bool:  # a regular file the record lists (or the pages' own folder): no link
        if path.is_symlink():
            return False
        return path.is_dir() if path == pages else path.is_file() and path.relative_to(out).as_posix() in ours

    foreign = [path.relative_to(out).as_posix() for path in found if not written(path)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise SaelabError(f"{out} holds {foreign[0]}{more}, which is not in the record of a saelab dashboard there "
                          f"({RECORD}); nothing was changed. Choose another folder for the dashboard (--out), or "
                          "remove it")
    return owned


def write_dashboard(features, out: str | Path, latents: Iterable[int], *, title: str = "") -> Path:
    """Write index.html and latents/<i>.html for `latents` of `features` (a FeatureSet) into `out`; returns the index
    page's path. The pages of an earlier dashboard there are removed, so the index and the pages always agree; a
    folder holding anything a dashboard did not write is refused (see check_folder), and so is a second process
    writing the same folder."""
    latents = sorted({features.check(int(i)) for i in latents})
    if not latents:
        raise ValueError("no latents to export")
    out = Path(out)
    check_folder(out)  # a user's folder is refused untouched, without even a lock file left in it
    with FolderLock(out, "dashboard"):
        owned = check_folder(out)  # again, now that no other process writes here
        pages = out / PAGES
        if pages.is_dir():
            remove_owned(pages, {name.split("/", 1)[1] for name in owned if name.startswith(PAGES + "/")}, "dashboard")
        pages.mkdir(exist_ok=True)
        files = [INDEX, *(f"{PAGES}/{latent}.html" for latent in latents)]
        write_atomic(out / RECORD, json.dumps({"written_by": "saelab dashboard", "files": files}, indent=1).encode())
        return _write_pages(features, out, latents, title)


def _write_pages(features, out: Path, latents: list[int], title: str) -> Path:
    """index.html and one page per latent (the folder is this process's, and its record already lists them)."""
    pages = out / PAGES
    exported = set(latents)
    table = features.stats
    ids = set(table.top.tokens.unique().tolist()) | set(table.sample.tokens.unique().tolist())
    features.token_texts(sorted(ids - {EMPTY}))  # decode every token once, in one call
    title = title or f"{features.name or 'SAE'} features"
    rows = []
    for number, latent in enumerate(latents):
        feature = features[latent]
        prev = latents[number - 1] if number else None
        next_ = latents[number + 1] if number + 1 < len(latents) else None
        nav = ['<a href="../index.html">index</a>']
        nav.append(f'<a id="prev" href="{prev}.html">&larr; latent {prev}</a>' if prev is not None else "")
        nav.append(f'<a id="next" href="{next_}.html">latent {next_} &rarr;</a>' if next_ is not None else "")
        card = feature.html(link=lambda j: f"{j}.html" if j in exported else None)
        (pages / f"{latent}.html").write_text(
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Latent {latent} &middot; {esc(title)}'
            f'</title><style>{PAGE_STYLE}{STYLE}</style></head><body><nav>{"".join(nav)}</nav>{card}'
            f"<script>{PAGE_SCRIPT}</script></body></html>", encoding="utf-8")
        rows.append([latent, round(feature.density, 8), round(feature.mean, 4), round(feature.max, 4),
                     [shown(t) for t in top_tokens(feature)], [shown(t) for t, _ in feature.promoted[:4]]]
                    + ([MASSIVE_NOTE] if feature.massive_only else []))
    stats = features.stats
    meta = (f"{stats.width} latents, {len(latents)} exported &middot; {stats.n_tokens:,} tokens"
            + (f" of {esc(stats.meta['source'])}" if stats.meta.get("source") else ""))
    flagged = sum(len(row) > 6 for row in rows)
    if flagged:  # a column and its legend only where some latent carries the flag
        meta += (f'<div id="legend" class="meta">&#9888; {MASSIVE_NOTE} ({flagged} of the exported latents): every '
                 f"top example is at a token whose activation norm is above {MASSIVE:g}&times; the median of the pass "
                 f"({stats.massive_norm:,.0f}), a massive activation such as an attention sink</div>")
    index = out / INDEX
    index.write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body><h1>{esc(title)}</h1><div class=\"meta\">{meta}</div>"
        '<input id="q" type="search" placeholder="search a token (e.g. Monday) or a latent number" autofocus>'
        '<div id="count" class="meta"></div><table class="index"><thead><tr><th data-key="0">latent</th>'
        '<th data-key="1">density</th><th data-key="2">mean</th><th data-key="3">max</th><th>fires on</th>'
        f'<th>promotes</th>{"<th>note</th>" if flagged else ""}</tr></thead><tbody id="rows"></tbody></table>'
        "<noscript><p>The table needs JavaScript; every latent's page is in the latents/ folder.</p></noscript>"
        f'<script type="application/json" id="data">{inline_json(rows)}</script><script>{INDEX_SCRIPT}</script>'
        "</body></html>", encoding="utf-8")
    return index
