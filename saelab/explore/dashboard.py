"""A static dashboard: a folder that opens from disk in any browser, offline, with no server.

    out/index.html          every exported latent in a table (density, mean, max, label, top tokens, promoted
                            tokens, and a flag on latents that fire only on massive-norm tokens), sortable, its
                            search ranked (ranking.py); its data and script are inline
    out/latents/<i>.html    one self-contained page per latent: its label slot, its card, links to its nearest
                            latents (each of which gets a page too, marked "neighbour" in the index), arrow keys step
    out/.saelab-dashboard.json   the files this dashboard consists of

Every file carries its own CSS (and the index its own small script); nothing is fetched, so the pages render the
same from file://, from a zip, or from any static host. One file per latent keeps each page small and fast.

A new dashboard may replace only the files a dashboard recorded writing there (as a cache may delete only its own
files): a folder holding anything else is refused before anything is written, and one process writes at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from saelab.errors import SaelabError
from saelab.explore.examples import EMPTY
from saelab.evals.core import MASSIVE
from saelab.explore.html import MASSIVE_NOTE, STYLE, esc, number, percent, shown, top_tokens
from saelab.explore.ranking import SCORE_SCRIPT, firing_terms
from saelab.files import LOCK_FILE, FolderLock, remove_owned, write_atomic

INDEX = "index.html"
PAGES = "latents"
RECORD = ".saelab-dashboard.json"
"""The files of the dashboard written in a folder (relative names): what the next dashboard there may replace."""

PAGE_STYLE = """body{margin:16px 22px;font:13px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d1d1f}
nav{margin-bottom:10px}nav a{margin-right:14px}a{color:#0a58ca;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:19px;margin:0 0 4px}.meta{color:#555}input[type=search]{font-size:14px;padding:4px 8px;width:460px;
margin:10px 12px 10px 0}label.filter{color:#555}table.index{border-collapse:collapse}table.index th{text-align:left;
cursor:pointer;border-bottom:2px solid #ccc;padding:3px 10px 3px 0;user-select:none;white-space:nowrap}
table.index td{padding:2px 10px 2px 0;border-bottom:1px solid #eee;vertical-align:top}
table.index td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.index td.label{max-width:260px;color:#333}.tag{font-size:11px;color:#666;background:#eef1f6;border-radius:3px;
padding:0 4px;margin-left:6px}.chip{background:#ffd9b3;border-radius:2px;white-space:pre;margin-right:4px;
font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.latent-label{margin:2px 0 8px;padding:4px 10px;border-left:3px solid #5b7fb5;background:#f4f7fb;font-size:14px}
.latent-label.empty{border-left-color:#ddd;background:none;color:#888;font-size:12px}
.chip{display:inline-block;max-width:10em;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom}"""

INDEX_SCRIPT = SCORE_SCRIPT + """
(function () {
  // a row: [latent, density, mean, max, fires on, promotes, [density, mean, max] as shown, neighbour (0/1),
  //         label, [[firing token, count], ...], firings counted, note]
  var rows = JSON.parse(document.getElementById('data').textContent);
  var body = document.getElementById('rows'), count = document.getElementById('count');
  var query = document.getElementById('q'), more = document.getElementById('neighbours');
  var key = null, descending = true, LIMIT = 500;
  var legend = (document.getElementById('legend') || {}).textContent || '';
  function cell(text, cls) { var td = document.createElement('td'); if (cls) td.className = cls; td.textContent = text; return td; }
  function tokens(list) {
    var td = document.createElement('td');
    list.forEach(function (t) { var s = document.createElement('span'); s.className = 'chip'; s.textContent = t; td.appendChild(s); });
    return td;
  }
  function row(r) {
    var tr = document.createElement('tr'), td = document.createElement('td'), a = document.createElement('a');
    a.href = 'latents/' + r[0] + '.html'; a.textContent = r[0]; td.appendChild(a); tr.appendChild(td);
    if (r[7]) { var tag = document.createElement('span'); tag.className = 'tag'; tag.textContent = 'neighbour'; td.appendChild(tag); }
    tr.appendChild(cell(r[6][0], 'n')); tr.appendChild(cell(r[6][1], 'n')); tr.appendChild(cell(r[6][2], 'n'));
    tr.appendChild(cell(r[8], 'label')); tr.appendChild(tokens(r[4])); tr.appendChild(tokens(r[5]));
    if (legend) { var flag = cell(r[11] ? '\u26a0 ' + r[11] : ''); flag.title = legend; flag.style.color = '#a00'; tr.appendChild(flag); }
    return tr;
  }
  function render() {
    var q = query.value.trim(), number = /^[0-9]+$/.test(q), scores = {};
    var shown = rows.filter(function (r) {
      if (number) return String(r[0]) === q;
      if (r[7] && !more.checked) return false;
      if (!q) return true;
      scores[r[0]] = score(q, r[9], r[10], r[8], r[5]);
      return scores[r[0]] > 0;
    });
    // a search lists the best match first; else latent order, which mixes the density bands (or a clicked column)
    if (key === null && q && !number) shown.sort(function (a, b) { return scores[b[0]] - scores[a[0]] || a[0] - b[0]; });
    else { var k = key === null ? 0 : key;
      shown.sort(function (a, b) { var d = a[k] < b[k] ? -1 : a[k] > b[k] ? 1 : 0; return key !== null && descending ? -d : d; }); }
    body.textContent = '';
    shown.slice(0, LIMIT).forEach(function (r) { body.appendChild(row(r)); });
    var listed = rows.filter(function (r) { return !r[7] || more.checked; }).length;
    count.textContent = (q ? shown.length + ' of ' : '') + listed + ' latents' + (q && !number ? ', best match first' : '')
      + (number && !shown.length ? ' (latent ' + q + ' was not exported)' : '') + (shown.length > LIMIT ? ' (first ' + LIMIT + ' shown)' : '');
  }
  Array.prototype.forEach.call(document.querySelectorAll('th[data-key]'), function (th) {
    th.addEventListener('click', function () {
      var k = Number(th.getAttribute('data-key'));
      descending = k === key ? !descending : k !== 0; key = k; render();
    });
  });
  var given = new URLSearchParams(window.location.search).get('q');  // index.html?q=Monday opens a search
  if (given) query.value = given;
  query.addEventListener('input', function () { key = null; render(); });
  query.addEventListener('keydown', function (e) {  // Enter opens the best match (a latent number: that latent)
    var first = body.querySelector('a');
    if (e.key === 'Enter' && first && query.value.trim()) window.location.href = first.getAttribute('href');
  });
  more.addEventListener('change', render);
  render();
})();
"""

PAGE_SCRIPT = """
document.addEventListener('keydown', function (e) {
  var link = document.getElementById(e.key === 'ArrowLeft' ? 'prev' : e.key === 'ArrowRight' ? 'next' : '');
  if (link) window.location.href = link.getAttribute('href');
});
"""
LABELS_FILE = "labels.json"
"""The labels a dashboard reads from an SAE's folder (saelab dashboard), unless given another file."""


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


def read_labels(path: str | Path) -> dict[int, str]:
    """{latent: label} from a JSON file {"123": "dates in a list", ...}: a person's (or a model's) reading of each
    latent, shown on its page and in the index, where search matches it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SaelabError(f"cannot read the labels file {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise SaelabError(f"the labels file {path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise SaelabError(f'the labels file {path} must hold one JSON object, {{"latent": "label", ...}}')
    labels = {}
    for key, text in data.items():
        if not str(key).isdigit() or not isinstance(text, str):
            raise SaelabError(f'the labels file {path}: {key!r}: {text!r} is not "latent number": "label text"')
        labels[int(key)] = text.strip()
    return labels


def with_neighbours(features, latents: Iterable[int]) -> tuple[list[int], set[int]]:
    """(every latent to give a page: `latents` and each one's listed nearest latents, sorted; the neighbours among
    them that were not asked for), so that no link on a page is dead."""
    chosen = {features.check(int(i)) for i in latents}
    neighbours = {int(j) for i in chosen for j in features.nearest[1][i].tolist()} - chosen
    return sorted(chosen | neighbours), neighbours


def write_dashboard(features, out: str | Path, latents: Iterable[int], *, title: str = "", neighbours: bool = True,
                    labels: dict[int, str] | str | Path | None = None, about: str = "") -> Path:
    """Write index.html and latents/<i>.html for `latents` of `features` (a FeatureSet) into `out`; returns the index
    page's path. With `neighbours` each latent's nearest latents get pages too (marked "neighbour" in the index),
    so the links between pages all lead somewhere. `labels` ({latent: text}, or a JSON file of them) are shown on
    the pages and in the index; `about` says on the index how the latents were chosen.

    The pages of an earlier dashboard there are removed, so the index and the pages always agree; a folder holding
    anything a dashboard did not write is refused (see check_folder), and so is a second process writing the same
    folder."""
    chosen = {features.check(int(i)) for i in latents}
    if not chosen:
        raise ValueError("no latents to export")
    exported, extra = with_neighbours(features, chosen) if neighbours else (sorted(chosen), set())
    labels = read_labels(labels) if isinstance(labels, (str, Path)) else dict(labels or {})
    out = Path(out)
    check_folder(out)  # a user's folder is refused untouched, without even a lock file left in it
    with FolderLock(out, "dashboard"):
        owned = check_folder(out)  # again, now that no other process writes here
        pages = out / PAGES
        if pages.is_dir():
            remove_owned(pages, {name.split("/", 1)[1] for name in owned if name.startswith(PAGES + "/")}, "dashboard")
        pages.mkdir(exist_ok=True)
        files = [INDEX, *(f"{PAGES}/{latent}.html" for latent in exported)]
        write_atomic(out / RECORD, json.dumps({"written_by": "saelab dashboard", "files": files}, indent=1).encode())
        rows = _write_pages(features, out, exported, extra, labels, title)
        return _write_index(features, out, rows, title, about)


def chip(token: str) -> str:
    """A token as an index chip shows it: shown(), with a run of spaces as its count, so that indentation reads
    short ("\u21b5\u2423\u00d716": a newline and 16 spaces)."""
    return re.sub(r" {3,}", lambda run: f"\u2423\u00d7{len(run.group())}", shown(token))


def label_html(latent: int, label: str) -> str:
    """A page's label slot: the label, or how to add one."""
    if label:
        return f'<div class="latent-label"><b>Label:</b> {esc(label)}</div>'
    return (f'<div class="latent-label empty">No label yet: add <code>"{latent}": "what it reads"</code> to '
            f"{LABELS_FILE} in the SAE's folder, or pass <code>--labels FILE</code>.</div>")


def _write_pages(features, out: Path, latents: list[int], extra: set[int], labels: dict[int, str],
                 title: str) -> list[list]:
    """One page per latent (the folder is this process's, and its record already lists them); returns the index's
    rows (see INDEX_SCRIPT for their fields)."""
    pages = out / PAGES
    exported = set(latents)
    table = features.stats
    ids = set(table.top.tokens.unique().tolist()) | set(table.sample.tokens.unique().tolist())
    features.token_texts(sorted(ids - {EMPTY}))  # decode every token once, in one call
    title = title or f"{features.name or 'SAE'} features"
    rows = []
    for number_, latent in enumerate(latents):
        feature = features[latent]
        prev = latents[number_ - 1] if number_ else None
        next_ = latents[number_ + 1] if number_ + 1 < len(latents) else None
        nav = ['<a href="../index.html">index</a>']
        nav.append(f'<a id="prev" href="{prev}.html">&larr; latent {prev}</a>' if prev is not None else "")
        nav.append(f'<a id="next" href="{next_}.html">latent {next_} &rarr;</a>' if next_ is not None else "")
        label = labels.get(latent, "")
        card = feature.html(link=lambda j: f"{j}.html" if j in exported else None, note=label_html(latent, label))
        (pages / f"{latent}.html").write_text(
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Latent {latent} &middot; {esc(title)}'
            f'</title><style>{PAGE_STYLE}{STYLE}</style></head><body><nav>{"".join(nav)}</nav>'
            f"{card}<script>{PAGE_SCRIPT}</script></body></html>", encoding="utf-8")
        terms, total = firing_terms(features, latent)
        rows.append([latent, round(feature.density, 8), round(feature.mean, 4), round(feature.max, 4),
                     [chip(t) for t in top_tokens(feature)], [chip(t) for t, _ in feature.promoted[:4]],
                     [percent(feature.density), number(feature.mean), number(feature.max)], int(latent in extra),
                     label, terms, total, MASSIVE_NOTE if feature.massive_only else ""])
    return rows


def _write_index(features, out: Path, rows: list[list], title: str, about: str) -> Path:
    """index.html: the rows as a searchable, sortable table (its data and script inline)."""
    stats = features.stats
    title = title or f"{features.name or 'SAE'} features"
    extra = sum(row[7] for row in rows)
    meta = (f"{stats.width:,} latents, {len(rows) - extra:,} exported"
            + (f" and the {extra:,} nearest latents of those (marked neighbour)" if extra else "")
            + f" &middot; {stats.n_tokens:,} tokens"
            + (f" of {esc(stats.meta['source'])}" if stats.meta.get("source") else ""))
    if about:
        meta += f'<div class="meta">{esc(about)}</div>'
    flagged = sum(bool(row[11]) for row in rows)
    if flagged:  # a column and its legend only where some latent carries the flag
        meta += (f'<div id="legend" class="meta">&#9888; {MASSIVE_NOTE} ({flagged} of the exported latents): every '
                 f"top example is at a token whose activation norm is above {MASSIVE:g}&times; the median of the pass "
                 f"({stats.massive_norm:,.0f}), a massive activation such as an attention sink</div>")
    neighbours = (f'<label class="filter"><input id="neighbours" type="checkbox"> list the {extra:,} neighbour pages '
                  "too</label>" if extra else '<input id="neighbours" type="hidden">')
    index = out / INDEX
    index.write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body><h1>{esc(title)}</h1><div class=\"meta\">{meta}</div>"
        '<input id="q" type="search" placeholder="search a token (e.g. Monday), a label, or a latent number" '
        f'autofocus>{neighbours}<div id="count" class="meta"></div><table class="index"><thead><tr>'
        '<th data-key="0">latent</th><th data-key="1">density</th><th data-key="2">mean</th><th data-key="3">max</th>'
        "<th>label</th><th>fires on</th>"
        f'<th>promotes</th>{"<th>note</th>" if flagged else ""}</tr></thead><tbody id="rows"></tbody></table>'
        "<noscript><p>The table needs JavaScript; every latent's page is in the latents/ folder.</p></noscript>"
        f'<script type="application/json" id="data">{inline_json(rows)}</script><script>{INDEX_SCRIPT}</script>'
        "</body></html>", encoding="utf-8")
    return index
