// modelgate's operator page. Reads the admin API every few seconds and calls it for
// promote, rollback and weight changes. The token typed in stays in this closure only:
// never in storage, a cookie or the URL. Elements are built with the DOM (textContent),
// never from HTML strings, so no name or reason from the server is ever run as markup.
'use strict';
(function () {
  const POLL_MS = 2500;
  const SVG = 'http://www.w3.org/2000/svg';

  let token = null;
  // Models whose card is open, and those the operator opened or closed by hand (an
  // automatic opening never overrides them).
  const opened = new Set();
  const touched = new Set();
  const cards = new Map();
  let filterText = '';
  let polling = false;
  let pollAgain = false;
  let timer = null;

  // ---- small helpers -------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG, tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.setAttribute('class', v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }
  function append(e, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === 'object' ? c : document.createTextNode(String(c)));
    }
  }
  function replace(e, ...children) {
    while (e.firstChild) e.removeChild(e.firstChild);
    append(e, children);
  }
  function num(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return '—';
    return Number(x).toFixed(digits === undefined ? 2 : digits);
  }
  function pct(x, digits) {
    return x === null || x === undefined ? '—' : num(100 * x, digits === undefined ? 2 : digits) + ' %';
  }
  function ms(x) {
    return x === null || x === undefined ? '—' : num(x, x < 10 ? 2 : 1) + ' ms';
  }
  function clock(unixMs) {
    if (!unixMs) return '—';
    const d = new Date(unixMs);
    return d.toLocaleString(undefined, { hour12: false });
  }
  function badge(text, kind) {
    return el('span', { class: 'badge ' + (kind || String(text).toLowerCase()) }, text);
  }
  function policyText(p) {
    if (p === null || p === undefined) return 'none in force';
    if (p === 'all') return 'all versions';
    if (typeof p === 'object' && 'latest' in p) return 'latest ' + p.latest;
    if (typeof p === 'object' && 'specific' in p) return 'specific ' + p.specific.join(', ');
    return JSON.stringify(p);
  }
  function path(...parts) {
    return parts.map(encodeURIComponent).join('/');
  }

  // ---- the admin API -------------------------------------------------------------
  async function api(method, url, body) {
    const headers = {};
    if (token) headers.Authorization = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const resp = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const err = new Error((data && data.error) || text || resp.statusText);
      err.status = resp.status;
      throw err;
    }
    return data;
  }

  // ---- token ---------------------------------------------------------------------
  function tokenState() {
    const s = document.getElementById('token-state');
    s.textContent = token
      ? 'token in use (kept in this page only)'
      : 'no token: read-only from this host when none is configured';
    s.className = token ? 'ok' : 'muted';
  }
  function setupToken() {
    const form = document.getElementById('token-form');
    const input = document.getElementById('token');
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = input.value.trim();
      input.value = '';
      token = t || null;
      tokenState();
      pollSoon();
    });
    document.getElementById('token-forget').addEventListener('click', () => {
      token = null;
      input.value = '';
      tokenState();
      pollSoon();
    });
    tokenState();
  }

  // ---- banner and status ---------------------------------------------------------
  function banner(text) {
    const b = document.getElementById('banner');
    if (!text) {
      b.hidden = true;
      b.textContent = '';
      return;
    }
    b.hidden = false;
    b.textContent = text;
  }
  function status(text, bad) {
    const s = document.getElementById('status');
    s.textContent = text;
    s.className = 'status' + (bad ? ' bad' : '');
  }

  // ---- models --------------------------------------------------------------------
  function driftByModel(drift) {
    const out = new Map();
    for (const st of (drift && drift.models) || []) {
      if (!out.has(st.model)) out.set(st.model, []);
      out.get(st.model).push(st);
    }
    return out;
  }
  function worstDrift(list) {
    const order = { OK: 0, WARN: 1, DRIFT: 2 };
    let worst = null;
    for (const s of list || []) {
      if (worst === null || order[s.state] > order[worst]) worst = s.state;
    }
    return worst;
  }
  function needsAttention(m, drift) {
    const r = m.routing && m.routing.routing;
    const failed = m.versions.some((v) => v.state !== 'READY' && v.reason !== 'unloaded');
    const d = worstDrift(drift);
    return Boolean((r && r.rollout) || failed || d === 'WARN' || d === 'DRIFT' || m.reason);
  }
  function matches(m, drift) {
    if (!filterText) return true;
    const hay = [m.name, m.reason, worstDrift(drift) || '']
      .concat(m.versions.map((v) => v.state + ' ' + (v.role || '') + ' v' + v.version))
      .concat(m.routing && m.routing.routing.rollout ? ['rollout'] : [])
      .join(' ')
      .toLowerCase();
    return filterText.split(/\s+/).every((w) => hay.includes(w));
  }

  function card(name) {
    let c = cards.get(name);
    if (c) return c;
    const details = el('details', { class: 'card', 'data-model': name });
    const summary = el('summary');
    const info = el('div', { class: 'info' });
    const msg = el('p', { class: 'action-msg', role: 'status', 'aria-live': 'polite' });
    const weight = el('input', {
      type: 'number', min: '0', max: '100', step: '1', class: 'weight',
      'aria-label': 'canary weight, percent', placeholder: 'weight %',
    });
    const reason = el('input', { type: 'text', class: 'reason', placeholder: 'reason (audit log)', 'aria-label': 'reason' });
    const buttons = {
      promote: el('button', { type: 'button', 'data-action': 'promote' }, 'Promote canary'),
      rollback: el('button', { type: 'button', 'data-action': 'rollback', class: 'danger' }, 'Roll back'),
      weight: el('button', { type: 'button', 'data-action': 'set-weight' }, 'Set canary weight'),
    };
    const actions = el('div', { class: 'actions' },
      buttons.promote, buttons.rollback,
      el('span', { class: 'weight-group' }, weight, buttons.weight),
      reason, msg);
    const rollout = el('div', { class: 'rollout' });
    const drift = el('div', { class: 'drift' });
    const audit = el('div', { class: 'model-audit' });
    details.append(summary, el('div', { class: 'body' }, info, actions, rollout, drift, audit));
    details.addEventListener('toggle', () => {
      // The page opens cards itself too: only a change it did not make is the operator's.
      if (details.open !== opened.has(name)) touched.add(name);
      if (details.open) opened.add(name);
      else opened.delete(name);
      if (details.open) pollSoon();
    });
    c = { details, summary, info, msg, weight, reason, buttons, rollout, drift, audit, model: null };
    buttons.promote.addEventListener('click', () => act(c, 'promote'));
    buttons.rollback.addEventListener('click', () => act(c, 'rollback'));
    buttons.weight.addEventListener('click', () => act(c, 'weight'));
    cards.set(name, c);
    return c;
  }

  async function act(c, what) {
    const m = c.model;
    if (!m) return;
    const q = c.reason.value.trim() ? '?reason=' + encodeURIComponent(c.reason.value.trim()) : '';
    c.msg.className = 'action-msg pending';
    c.msg.textContent = 'sending…';
    try {
      if (what === 'weight') {
        const r = m.routing && m.routing.routing;
        if (!r || !r.canary) throw new Error('this model has no canary to weigh');
        const w = Number(c.weight.value);
        if (c.weight.value === '' || !(w >= 0 && w <= 100)) throw new Error('a weight is a percentage from 0 to 100');
        const body = {
          stable: r.stable === undefined ? m.routing.effective_stable : r.stable,
          canary: { version: r.canary.version, weight: w },
        };
        if (r.shadows && r.shadows.length) body.shadows = r.shadows;
        await api('PUT', '/admin/models/' + path(m.name) + '/traffic' + q, body);
      } else {
        await api('POST', '/admin/models/' + path(m.name, what) + q);
      }
      c.msg.className = 'action-msg ok';
      c.msg.textContent = (what === 'weight' ? 'weight set' : what === 'promote' ? 'promoted' : 'rolled back') + ' at ' + clock(Date.now());
      c.reason.value = '';
    } catch (e) {
      c.msg.className = 'action-msg refusal';
      c.msg.textContent = 'refused' + (e.status ? ' (' + e.status + ')' : '') + ': ' + e.message;
      if (e.status === 401 && !token) document.getElementById('token').focus();
    }
    pollSoon();
  }

  function liveCells(v) {
    const l = v.live;
    if (!l) return [el('td', {}, '—'), el('td', {}, '—'), el('td', {}, '—')];
    return [
      el('td', { class: 'num' }, l.requests_per_sec === null ? '—' : num(l.requests_per_sec, 1) + '/s'),
      el('td', { class: 'num' + (l.error_rate > 0 ? ' bad' : '') }, pct(l.error_rate)),
      el('td', { class: 'num' }, ms(l.p99_ms)),
    ];
  }

  function lineage(v) {
    if (!v.lineage) return null;
    const parts = typeof v.lineage === 'object'
      ? Object.entries(v.lineage).map(([k, x]) => k + ': ' + (typeof x === 'object' ? JSON.stringify(x) : x))
      : [String(v.lineage)];
    return el('div', { class: 'lineage muted' }, 'lineage — ', parts.join(' · '));
  }

  function renderSummary(c, m, drift) {
    const r = m.routing && m.routing.routing;
    const ready = m.versions.filter((v) => v.state === 'READY').length;
    const bad = m.versions.filter((v) => v.state === 'UNAVAILABLE' && v.reason !== 'unloaded').length;
    const loading = m.versions.filter((v) => v.state === 'LOADING').length;
    let rate = 0;
    let any = false;
    for (const v of m.versions) {
      if (v.live && v.live.requests_per_sec !== null) {
        rate += v.live.requests_per_sec;
        any = true;
      }
    }
    const d = worstDrift(drift);
    replace(c.summary,
      el('span', { class: 'name' }, m.name),
      badge(ready + ' ready', ready ? 'ready' : 'unavailable'),
      loading ? badge(loading + ' loading', 'loading') : null,
      bad ? badge(bad + ' failed', 'failed') : null,
      m.routing && m.routing.effective_stable !== null ? el('span', { class: 'chip' }, 'stable v' + m.routing.effective_stable) : null,
      r && r.canary ? el('span', { class: 'chip canary' }, 'canary v' + r.canary.version + ' @ ' + num(r.canary.weight, 0) + ' %') : null,
      r && r.rollout ? badge('rollout step ' + (r.rollout.step + 1), 'running') : null,
      d ? badge('drift ' + d, d.toLowerCase()) : null,
      el('span', { class: 'rate muted' }, any ? num(rate, 1) + ' req/s' : ''));
  }

  function renderInfo(c, m) {
    const rv = m.routing;
    const r = rv && rv.routing;
    const rows = m.versions.map((v) => el('tr', { 'data-version': v.version },
      el('td', {}, 'v' + v.version),
      el('td', {}, badge(v.state)),
      el('td', {}, v.role ? badge(v.role, 'role') : '—'),
      liveCells(v),
      el('td', { class: 'reason-cell' }, v.reason || '', lineage(v))));
    const routing = [];
    if (rv) {
      routing.push(el('div', {}, el('b', {}, 'stable '), rv.effective_stable === null ? 'none ready' : 'v' + rv.effective_stable,
        r.stable !== undefined && r.stable !== rv.effective_stable ? ' (routing names v' + r.stable + ')' : ''));
      routing.push(el('div', {}, el('b', {}, 'canary '), r.canary ? 'v' + r.canary.version + ' at ' + num(r.canary.weight, 1) + ' %' : 'none'));
      routing.push(el('div', {}, el('b', {}, 'shadows '), r.shadows && r.shadows.length
        ? r.shadows.map((s) => 'v' + s.version + ' (' + num(s.percent, 0) + ' %)').join(', ') : 'none'));
      if (r.rejected && r.rejected.length) routing.push(el('div', {}, el('b', {}, 'rejected '), r.rejected.map((v) => 'v' + v).join(', ')));
      if (rv.routing_error) routing.push(el('div', { class: 'bad' }, 'routing.toml not in force: ' + rv.routing_error));
    }
    replace(c.info,
      m.reason ? el('p', { class: 'bad' }, m.reason) : null,
      el('div', { class: 'meta' },
        el('div', {}, el('b', {}, 'version policy '), policyText(m.version_policy)),
        routing),
      el('div', { class: 'scroll' }, el('table', { class: 'versions' },
        el('thead', {}, el('tr', {}, ['version', 'state', 'role', 'rate', 'errors', 'p99', 'reason / lineage'].map((t) => el('th', {}, t)))),
        el('tbody', {}, rows))),
      el('p', { class: 'muted small' }, 'Rates over the last ' +
        num(Math.max(0, ...m.versions.map((v) => (v.live ? v.live.window_secs : 0))), 0) +
        ' s; errors are server-side failures; p99 of successful requests. Shadow copies are not counted.'));
    const hasCanary = Boolean(r && r.canary);
    c.buttons.promote.disabled = !hasCanary;
    c.buttons.weight.disabled = !hasCanary;
    c.weight.disabled = !hasCanary;
    c.buttons.rollback.disabled = !(hasCanary || (r && r.rollout));
  }

  // ---- rollout timeline ----------------------------------------------------------
  function armRow(label, a) {
    return el('tr', {}, el('th', {}, label), el('td', { class: 'num' }, a.requests), el('td', { class: 'num' }, a.errors),
      el('td', { class: 'num' }, ms(a.p50_ms)), el('td', { class: 'num' }, ms(a.p99_ms)));
  }
  function analysisView(a) {
    if (!a) return null;
    const checks = (a.checks || []).map((k) => el('tr', { 'data-criterion': k.criterion },
      el('td', {}, k.criterion), el('td', {}, badge(k.status)), el('td', {}, k.test || ''),
      el('td', { class: 'num' }, k.observed === null || k.observed === undefined ? '—' : num(k.observed, 4)),
      el('td', { class: 'num' }, k.threshold === null || k.threshold === undefined ? '—' : num(k.threshold, 4)),
      el('td', { class: 'num' }, k.count !== undefined && k.count !== null ? k.count + (k.of !== undefined && k.of !== null ? ' / ' + k.of : '') : '—'),
      el('td', { class: 'num' }, k.p_value === null || k.p_value === undefined ? '—' : Number(k.p_value).toExponential(2)),
      el('td', { class: 'small' }, k.note || '')));
    return el('div', { class: 'analysis' },
      el('div', { class: 'muted small' }, a.look + ' look after ' + num(a.elapsed_secs, 1) + ' of ' + num(a.interval_secs, 0) + ' s, weight ' + num(a.weight, 0) + ' %, α ' + a.alpha),
      el('div', { class: 'scroll' }, el('table', { class: 'arms' },
        el('thead', {}, el('tr', {}, ['', 'requests', 'errors', 'p50', 'p99'].map((t) => el('th', {}, t)))),
        el('tbody', {}, armRow('canary', a.canary), armRow('stable', a.stable)))),
      el('div', { class: 'scroll' }, el('table', { class: 'checks' },
        el('thead', {}, el('tr', {}, ['criterion', 'status', 'test', 'observed', 'limit', 'count', 'p-value', 'note'].map((t) => el('th', {}, t)))),
        el('tbody', {}, checks))));
  }
  function progress(fraction) {
    const f = Math.max(0, Math.min(1, fraction));
    return svg('svg', { class: 'progress', viewBox: '0 0 100 6', preserveAspectRatio: 'none', role: 'img', 'aria-label': Math.round(100 * f) + ' % of the interval' },
      svg('rect', { x: 0, y: 0, width: 100, height: 6, class: 'track' }),
      svg('rect', { x: 0, y: 0, width: (100 * f).toFixed(1), height: 6, class: 'fill' }));
  }
  function renderRollout(c, view) {
    if (!view) {
      replace(c.rollout);
      return;
    }
    const steps = view.steps.map((s) => {
      const d = s.decision;
      const elapsed = s.status === 'running' && s.started_ms ? (Date.now() - s.started_ms) / 1000 : null;
      return el('li', { class: 'step ' + s.status, 'data-step': s.index, 'data-status': s.status },
        el('div', { class: 'step-head' },
          el('span', { class: 'step-n' }, 'step ' + (s.index + 1)),
          el('span', { class: 'step-w' }, num(s.weight, 0) + ' %'),
          badge(s.status),
          el('span', { class: 'muted small' }, s.started_ms ? 'from ' + clock(s.started_ms) : '')),
        elapsed !== null ? el('div', { class: 'small' }, progress(elapsed / view.plan.interval_secs),
          num(elapsed, 0) + ' s of ' + num(view.plan.interval_secs, 0) + ' s' + (elapsed > view.plan.interval_secs
            ? ': the interval is over, the step waits for enough requests to be judged'
            : '; a breach that is already certain acts early, the rest is judged at the end')) : null,
        d ? el('div', { class: 'verdict' }, el('b', {}, d.action), ' by ', d.actor, ' at ', clock(d.unix_ms), ': ', d.reason) : null,
        d ? analysisView(d.analysis) : null);
    });
    replace(c.rollout,
      el('h3', {}, 'Rollout ', view.running ? badge('running') : badge(view.ended ? view.ended.action : 'ended', 'ended'),
        el('span', { class: 'muted small' }, ' canary v' + view.canary + ' over stable v' + view.stable)),
      el('ol', { class: 'timeline' }, steps),
      view.ended ? el('p', { class: 'small' }, 'ended: ', el('b', {}, view.ended.action), ' by ', view.ended.actor, ' at ', clock(view.ended.unix_ms), ': ', view.ended.reason) : null);
  }

  // ---- drift ---------------------------------------------------------------------
  function histogram(f, evidence) {
    const n = f.reference.length;
    const live = f.live || [];
    const top = Math.max(0.01, ...f.reference, ...live);
    const W = 320, H = 150, L = 34, B = 24, T = 8;
    const pw = W - L - 16, ph = H - B - T;
    const bw = pw / n;
    const parts = [];
    for (const frac of [0, 0.5, 1]) {
      const y = T + ph - frac * ph;
      parts.push(svg('line', { x1: L, x2: L + pw, y1: y, y2: y, class: 'grid' }));
      parts.push(svg('text', { x: L - 4, y: y + 3, class: 'tick', 'text-anchor': 'end' }, pct(frac * top, 0)));
    }
    for (let i = 0; i < n; i++) {
      const x = L + i * bw;
      const rh = (f.reference[i] / top) * ph;
      parts.push(svg('rect', { class: 'bar-ref', x: (x + bw * 0.08).toFixed(2), y: (T + ph - rh).toFixed(2), width: (bw * 0.4).toFixed(2), height: rh.toFixed(2) },
        svg('title', {}, 'reference: ' + pct(f.reference[i], 1))));
      if (f.live) {
        const lh = (live[i] / top) * ph;
        parts.push(svg('rect', { class: 'bar-live', x: (x + bw * 0.5).toFixed(2), y: (T + ph - lh).toFixed(2), width: (bw * 0.4).toFixed(2), height: lh.toFixed(2) },
          svg('title', {}, 'live window: ' + pct(live[i], 1))));
      }
    }
    // Bin edges under the bars: the outer ends are the reference's min and max.
    const edges = [f.min].concat(f.edges, [f.max]);
    const every = Math.max(1, Math.ceil(edges.length / 6));
    edges.forEach((e, i) => {
      if (i % every !== 0 && i !== edges.length - 1) return;
      const anchor = i === 0 ? 'start' : i === edges.length - 1 ? 'end' : 'middle';
      parts.push(svg('text', { x: (L + i * bw).toFixed(1), y: H - 8, class: 'tick', 'text-anchor': anchor }, Number(e).toPrecision(3)));
    });
    const ev = (evidence || []).find((x) => x.feature === f.name);
    return el('figure', { class: 'hist' + (ev ? ' ' + ev.level : ''), 'data-feature': f.name },
      el('figcaption', {}, el('b', {}, f.name), ev ? [' ', badge(ev.test + ' ' + num(ev.statistic, 3) + ' ' + ev.level, ev.level)] : null,
        f.live ? null : el('span', { class: 'muted small' }, ' no window tested yet')),
      svg('svg', { viewBox: '0 0 ' + W + ' ' + H, class: 'chart', role: 'img', 'data-feature': f.name,
        'aria-label': f.name + ': reference and live window shares per bin' }, parts));
  }
  function evidenceList(list) {
    if (!list || !list.length) return el('span', { class: 'muted' }, 'none');
    return el('ul', { class: 'evidence' }, list.map((e) => el('li', {}, badge(e.level), ' ', e.feature, ': ', e.test, ' ', num(e.statistic, 4),
      e.p_value !== undefined ? ', p ' + Number(e.p_value).toExponential(2) + ' < ' + Number(e.threshold).toExponential(2) : ' ≥ ' + e.threshold)));
  }
  function renderDrift(c, view) {
    if (!view) {
      replace(c.drift);
      return;
    }
    const versions = view.versions.filter((v) => v.status || v.features.length);
    if (!versions.length) {
      replace(c.drift);
      return;
    }
    replace(c.drift, el('h3', {}, 'Drift'), versions.map((v) => {
      const s = v.status;
      return el('div', { class: 'drift-version', 'data-version': v.version },
        el('div', { class: 'drift-head' }, el('b', {}, 'v' + v.version), ' ', s ? badge(s.state) : badge('no samples', 'muted'),
          el('span', { class: 'muted small' }, ' reference ' + v.reference +
            (s ? ' · ' + s.rows_seen + ' rows seen · ' + s.windows_tested + ' windows of ' + s.window + ' tested · ' + s.episodes + ' episodes, ' + s.events + ' events' : ''))),
        s ? el('div', { class: 'small' }, 'evidence of the last window: ', evidenceList(s.evidence)) : null,
        s && s.episode_evidence.length ? el('div', { class: 'small' }, 'evidence that started the episode: ', evidenceList(s.episode_evidence)) : null,
        v.features.length ? el('div', { class: 'legend small' }, el('span', { class: 'key ref' }), 'reference (profile) ', el('span', { class: 'key live' }), 'last tested window') : null,
        el('div', { class: 'hists' }, v.features.map((f) => histogram(f, s && s.evidence))));
    }));
  }

  function auditTable(entries, withModel) {
    if (!entries.length) return el('p', { class: 'muted' }, 'no entries');
    return el('div', { class: 'scroll' }, el('table', { class: 'audit' },
      el('thead', {}, el('tr', {}, ['time', withModel ? 'model' : null, 'actor', 'action', 'reason'].filter(Boolean).map((t) => el('th', {}, t)))),
      el('tbody', {}, entries.slice().reverse().map((e) => el('tr', {},
        el('td', { class: 'nowrap' }, clock(e.unix_ms)), withModel ? el('td', {}, e.model) : null,
        el('td', {}, e.actor), el('td', {}, badge(e.action, 'action')), el('td', {}, e.reason))))));
  }

  // ---- outbox --------------------------------------------------------------------
  function renderOutbox(targets) {
    const box = document.getElementById('outbox');
    if (!targets.length) {
      replace(box, el('p', { class: 'muted' }, 'no webhook target is configured'));
      return;
    }
    replace(box, targets.map((t) => el('div', { class: 'target', 'data-target': t.name },
      el('div', {}, el('b', {}, t.name), ' ', el('span', { class: 'muted' }, t.endpoint), ' ',
        t.disabled ? badge('disabled (410)', 'failed') : null, ' ',
        badge('backlog ' + t.backlog, t.backlog ? 'warn' : 'ok')),
      t.oldest ? el('div', { class: 'small' }, 'oldest waiting: ' + t.oldest.id + ', ' + t.oldest.attempts + ' attempts, next at ' + clock(t.oldest.next_attempt_ms) +
        (t.oldest.last_error ? ': ' + t.oldest.last_error : '')) : null,
      t.recent.length ? el('div', { class: 'scroll' }, el('table', { class: 'deliveries' },
        el('thead', {}, el('tr', {}, ['time', 'event', 'outcome', 'attempt', 'error'].map((x) => el('th', {}, x)))),
        el('tbody', {}, t.recent.map((a) => el('tr', {}, el('td', { class: 'nowrap' }, clock(a.unix_ms)), el('td', {}, a.event),
          el('td', {}, badge(a.outcome)), el('td', { class: 'num' }, a.attempts), el('td', {}, a.error))))))
        : el('p', { class: 'muted small' }, 'no delivery attempted since the server started'))));
  }

  // ---- polling -------------------------------------------------------------------
  function pollSoon() {
    if (polling) {
      pollAgain = true;
      return;
    }
    if (timer) clearTimeout(timer);
    timer = setTimeout(poll, 0);
  }

  async function poll() {
    polling = true;
    timer = null;
    try {
      const [overview, drift, outbox, audit] = await Promise.all([
        api('GET', '/admin/overview'),
        api('GET', '/admin/drift'),
        api('GET', '/admin/outbox'),
        api('GET', '/admin/audit?limit=100'),
      ]);
      const byModel = driftByModel(drift);
      const list = document.getElementById('models');
      const seen = new Set();
      let shown = 0;
      for (const m of overview.models) {
        seen.add(m.name);
        const c = card(m.name);
        c.model = m;
        const d = byModel.get(m.name);
        if (!touched.has(m.name) && needsAttention(m, d) && !opened.has(m.name)) {
          opened.add(m.name);
          c.details.open = true;
        }
        const visible = matches(m, d);
        c.details.hidden = !visible;
        if (visible) shown++;
        renderSummary(c, m, d);
        if (c.details.parentNode !== list) list.appendChild(c.details);
      }
      // Keep the cards in name order; drop those of models that are gone.
      for (const [name, c] of cards) {
        if (!seen.has(name)) {
          c.details.remove();
          cards.delete(name);
        }
      }
      for (const m of overview.models) list.appendChild(cards.get(m.name).details);
      document.getElementById('model-count').textContent = shown === overview.models.length
        ? '(' + overview.models.length + ')' : '(' + shown + ' of ' + overview.models.length + ')';
      // Details only for the open cards: 50 closed models cost 4 requests a poll.
      await Promise.all(overview.models.filter((m) => cards.get(m.name).details.open).map(async (m) => {
        const c = cards.get(m.name);
        renderInfo(c, m);
        const [rollout, hist] = await Promise.all([
          api('GET', '/admin/models/' + path(m.name) + '/rollout'),
          m.routing ? api('GET', '/admin/drift/' + path(m.name) + '/histograms') : Promise.resolve(null),
        ]);
        renderRollout(c, rollout);
        renderDrift(c, hist);
        replace(c.audit, el('h3', {}, 'Recent changes'), auditTable(audit.filter((e) => e.model === m.name).slice(-5), false));
      }));
      renderOutbox(outbox);
      replace(document.getElementById('audit'), auditTable(audit.filter((e) => !filterText || e.model.toLowerCase().includes(filterText)).slice(-30), true));
      banner(null);
      status('updated ' + new Date().toLocaleTimeString(undefined, { hour12: false }), false);
    } catch (e) {
      const refused = e.status === 401 || e.status === 403;
      banner(refused
        ? 'The admin API refused to answer (' + e.status + '): ' + e.message + (token ? '' : '. Enter a token with the read permission above.')
        : 'Cannot read the admin API: ' + e.message);
      status('not updated', true);
    } finally {
      polling = false;
      if (pollAgain) {
        pollAgain = false;
        timer = setTimeout(poll, 0);
      } else {
        timer = setTimeout(poll, POLL_MS);
      }
    }
  }

  function setup() {
    setupToken();
    const filter = document.getElementById('filter');
    filter.addEventListener('input', () => {
      filterText = filter.value.trim().toLowerCase();
      pollSoon();
    });
    document.getElementById('expand-all').addEventListener('click', () => {
      for (const [name, c] of cards) {
        if (c.details.hidden) continue;
        touched.add(name);
        opened.add(name);
        c.details.open = true;
      }
      pollSoon();
    });
    document.getElementById('collapse-all').addEventListener('click', () => {
      for (const [name, c] of cards) {
        touched.add(name);
        opened.delete(name);
        c.details.open = false;
      }
    });
    poll();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', setup);
  else setup();
})();
