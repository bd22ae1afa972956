// Sluice console: one page over the REST API. No framework, no third-party code, no inline
// script (the Content-Security-Policy forbids it). The session is an HttpOnly cookie; the CSRF
// token lives in this script's memory only. Every element is built with the DOM API, never
// from HTML strings, so nothing the API returns is ever parsed as markup.
'use strict';

const S = { csrf: '', role: null, subject: '', rtmp: '', srt: '', timers: [], tail: null };
const RANK = { read: 1, write: 2, admin: 3 };
const can = (role) => S.role !== null && RANK[S.role] >= RANK[role];
const main = () => document.getElementById('main');

// ---- DOM helpers ----------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

let fieldSeq = 0;
function field(label, input) {
  if (!input.id) input.id = `f${++fieldSeq}`;
  return h('label', { for: input.id }, label, input);
}
function check(label, input) {
  if (!input.id) input.id = `f${++fieldSeq}`;
  return h('label', { class: 'check', for: input.id }, input, label);
}
function table(caption, heads, rows, empty) {
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, heads.map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: heads.length, class: 'muted' }, empty || 'None.')))));
}
function copyButton(text, label) {
  return h('button', { type: 'button', class: 'quiet', 'aria-label': `Copy ${label}`, onclick: () => {
    navigator.clipboard.writeText(text).then(() => notify(`${label} copied`), () => notify('Copy failed: select and copy it by hand', true));
  } }, 'Copy');
}
function shown(label, text, id) {
  return [h('strong', {}, label), ' ', copyButton(text, label), h('code', { id, class: 'block' }, text)];
}
function notify(message, error) {
  const box = h('div', { class: error ? 'error' : '', role: error ? 'alert' : null }, message);
  document.getElementById('toast').append(box);
  setTimeout(() => box.remove(), error ? 8000 : 4000);
}
const when = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : '—');
const bits = (bps) => (bps >= 1e6 ? `${(bps / 1e6).toFixed(2)} Mb/s` : `${Math.round(bps / 1e3)} kb/s`);
const enc = encodeURIComponent;

// ---- the API --------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET') headers['X-CSRF-Token'] = S.csrf;
  const response = await fetch(path, {
    method, headers, credentials: 'same-origin', cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && S.role !== null && path !== '/console/session') {
    signedOut('Your session ended: sign in again.');
    throw new Error('signed out');
  }
  const type = response.headers.get('content-type') || '';
  const data = response.status === 204 ? null : type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = data && typeof data === 'object' ? (data.detail || data.title || data.message) : data;
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return data;
}

// Runs an action, reporting its error instead of throwing.
async function attempt(action, done) {
  try {
    const result = await action();
    if (done) notify(done);
    return result;
  } catch (e) {
    if (e.message !== 'signed out') notify(e.message, true);
    return undefined;
  }
}

// ---- session --------------------------------------------------------------------------------

function signedIn(session) {
  S.csrf = session.csrf;
  S.role = session.role;
  S.subject = session.subject;
  S.rtmp = session.public_rtmp_url;
  S.srt = session.public_srt_url;
  document.getElementById('who').textContent = `${session.subject} (${session.role})`;
  document.getElementById('nav').hidden = false;
  document.getElementById('signout').hidden = false;
  for (const li of document.querySelectorAll('[data-role]')) li.hidden = !can(li.dataset.role);
  if (!location.hash || location.hash === '#/signin') location.hash = '#/overview';
  else route();
}

function signedOut(message) {
  S.csrf = ''; S.role = null; S.subject = '';
  stopTimers();
  document.getElementById('who').textContent = '';
  document.getElementById('nav').hidden = true;
  document.getElementById('signout').hidden = true;
  signInPage(message);
}

function signInPage(message) {
  const key = h('input', { id: 'signin-key', type: 'password', autocomplete: 'current-password' });
  const user = h('input', { id: 'signin-user', autocomplete: 'username' });
  const password = h('input', { id: 'signin-password', type: 'password', autocomplete: 'current-password' });
  const submit = async (ev) => {
    ev.preventDefault();
    const body = key.value ? { key: key.value } : { user: user.value, password: password.value };
    const session = await attempt(() => api('POST', '/console/session', body));
    key.value = ''; password.value = '';
    if (session) signedIn(session);
  };
  render('Sign in', h('div', { class: 'signin' },
    message ? h('p', { role: 'alert' }, message) : null,
    h('form', { id: 'signin', onsubmit: submit },
      field('API key or API JWT', key),
      h('details', {}, h('summary', {}, 'Static admin user instead'), field('User', user), field('Password', password)),
      h('button', { id: 'signin-submit', type: 'submit' }, 'Sign in')),
    h('p', { class: 'muted' }, 'The key is exchanged for a session cookie and is not stored in this browser.')));
}

// ---- routing --------------------------------------------------------------------------------

function stopTimers() {
  for (const t of S.timers) clearInterval(t);
  S.timers = [];
  if (S.tail) { S.tail.close(); S.tail = null; }
}

function every(ms, fn) {
  S.timers.push(setInterval(fn, ms));
}

function render(title, ...content) {
  const m = main();
  m.replaceChildren(h('h1', {}, title), ...content);
  document.title = `${title} · Sluice console`;
}

const PAGES = {
  overview: overviewPage, apps: appsPage, app: appPage, streams: streamsPage, stream: streamPage,
  subscribers: subscribersPage, keys: keysPage, sessions: sessionsPage, decisions: decisionsPage,
};

function route() {
  stopTimers();
  if (S.role === null) return signInPage();
  const [name, query] = location.hash.replace(/^#\/?/, '').split('?');
  const params = new URLSearchParams(query || '');
  const page = PAGES[name] || overviewPage;
  for (const a of document.querySelectorAll('#nav a')) {
    const current = a.getAttribute('href') === `#/${name}` || (name === 'app' && a.getAttribute('href') === '#/apps')
      || (name === 'stream' && a.getAttribute('href') === '#/streams');
    if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  page(params).catch((e) => { if (e.message !== 'signed out') render('Error', h('p', { role: 'alert' }, e.message)); });
  main().focus({ preventScroll: true });
}

// ---- Overview -------------------------------------------------------------------------------

async function overviewPage() {
  const body = h('div', { id: 'overview' });
  render('Overview', body);
  const draw = async () => {
    const since = Math.floor(Date.now() / 1000) - 60;
    const [nodes, live, log, recent] = await Promise.all([
      api('GET', '/v1/nodes'), api('GET', '/v1/stats/streams'), api('GET', '/v1/log'),
      api('GET', `/v1/decisions?since=${since}&limit=1000`),
    ]);
    const allowed = recent.decisions.filter((d) => d.allowed).reduce((n, d) => n + d.count, 0);
    const refused = recent.decisions.filter((d) => !d.allowed).reduce((n, d) => n + d.count, 0);
    const figure = (n, l, id) => h('div', { class: 'figure' }, h('div', { class: 'n', id }, n), h('div', { class: 'l' }, l));
    body.replaceChildren(
      h('section', { class: 'grid', 'aria-label': 'Figures' },
        figure(nodes.nodes.length, 'workers', 'fig-workers'),
        figure(new Set(live.streams.map((s) => `${s.app}/${s.stream}`)).size, 'live streams', 'fig-live'),
        figure((allowed / 60).toFixed(2), 'allowed per second (last minute)', 'fig-allowed'),
        figure((refused / 60).toFixed(2), 'refused per second (last minute)', 'fig-refused'),
        figure(log.head, 'log head', 'fig-head'),
        figure(log.anchor ? log.anchor.position : '—',
          log.anchor ? `last signed anchor, ${new Date(log.anchor.at).toLocaleTimeString()}` : 'no anchor signed yet', 'fig-anchor')),
      table('Workers', ['Node', 'Position', 'Lag', 'Digest', 'Sessions', 'Pending decisions', 'State'],
        nodes.nodes.map((n) => h('tr', {},
          h('td', {}, n.node_id), h('td', { class: 'num' }, n.position), h('td', { class: 'num' }, n.lag),
          h('td', { class: n.digest_match === false ? 'deny' : '' }, n.digest_match === null ? 'pending' : n.digest_match ? 'match' : 'DIFFERS'),
          h('td', { class: 'num' }, n.live_sessions), h('td', { class: 'num' }, n.decisions_pending),
          h('td', { class: n.stale ? 'deny' : 'allow' }, n.stale ? 'stale' : n.ready ? 'ready' : 'starting'))),
        'No worker has sent a heartbeat.'),
      table('Live streams', ['Stream', 'Worker', 'Publisher', 'Protocol', 'Bitrate (10 s)', 'Players', 'Uptime'],
        live.streams.map((s) => h('tr', { 'data-stream': `${s.app}/${s.stream}` },
          h('td', {}, `${s.app}/${s.stream}`), h('td', {}, s.node_id), h('td', { class: 'publisher' }, s.publisher || '—'),
          h('td', {}, s.protocol),
          h('td', { class: 'num' }, bits(s.bitrate_10s)), h('td', { class: 'num' }, s.players),
          h('td', { class: 'num' }, `${s.uptime_secs} s`))),
        'Nothing is live.'));
  };
  await draw();
  every(2000, () => draw().catch(() => {}));
}

// ---- Apps -----------------------------------------------------------------------------------

async function appsPage() {
  const { apps } = await api('GET', '/v1/apps');
  const name = h('input', { id: 'new-app-name', required: true, pattern: '[A-Za-z0-9_.\\-]+' });
  const create = async (ev) => {
    ev.preventDefault();
    if (await attempt(() => api('POST', '/v1/apps', { name: name.value }), `App ${name.value} created`)) {
      location.hash = `#/app?name=${enc(name.value)}`;
    }
  };
  render('Apps',
    can('write') ? h('form', { class: 'inline', id: 'new-app', onsubmit: create },
      field('New app', name), h('button', { type: 'submit' }, 'Create app')) : null,
    table('Apps', ['App', 'Publish', 'Play', 'Streams', 'Secrets set'],
      apps.map((a) => h('tr', {},
        h('td', {}, h('a', { href: `#/app?name=${enc(a.name)}` }, a.name)),
        h('td', {}, a.policy.publish.methods.join(', ') || 'nobody'),
        h('td', {}, a.policy.play.methods.join(', ') || 'nobody'),
        h('td', { class: 'num' }, a.streams), h('td', {}, a.secrets.join(', ') || '—'))),
      'No app yet.'));
}

const METHODS = ['open', 'one_time_token', 'hash', 'hmac', 'jwt', 'totp', 'webhook'];
const SECRETS = ['hash', 'jwt', 'webhook', 'srt_passphrase'];

async function appPage(params) {
  const appName = params.get('name');
  const app = await api('GET', `/v1/apps/${enc(appName)}`);
  const admin = can('admin');
  const p = app.policy;
  const action = (which) => {
    const ap = p[which];
    const boxes = METHODS.map((m) => h('input', { type: 'checkbox', value: m, checked: ap.methods.includes(m), disabled: !admin, 'data-method': `${which}-${m}` }));
    const cidrs = h('textarea', { id: `${which}-cidrs`, disabled: !admin, rows: 2 }, ap.cidrs.join('\n'));
    const undefinedOk = h('input', { type: 'checkbox', id: `${which}-undefined`, checked: ap.accept_undefined_streams, disabled: !admin });
    const read = () => ({
      methods: boxes.filter((b) => b.checked).map((b) => b.value),
      cidrs: cidrs.value.split(/[\s,]+/).filter(Boolean),
      accept_undefined_streams: undefinedOk.checked,
    });
    return { read, ui: h('fieldset', {}, h('legend', {}, which === 'publish' ? 'Publish' : 'Play'),
      h('div', { class: 'inline', role: 'group', 'aria-label': `${which} methods` }, boxes.map((b, i) => check(METHODS[i], b))),
      field('Allowed client networks (CIDRs, one per line; empty: anywhere)', cidrs),
      check('Accept streams that are not registered', undefinedOk)) };
  };
  const publish = action('publish');
  const play = action('play');
  const period = h('input', { type: 'number', min: 1, value: p.totp.period_secs, disabled: !admin, id: 'totp-period' });
  const digits = h('input', { type: 'number', min: 6, max: 8, value: p.totp.digits, disabled: !admin, id: 'totp-digits' });
  const jwks = h('input', { type: 'url', value: p.jwt.jwks_url || '', disabled: !admin, id: 'jwks-url' });
  const hook = h('input', { type: 'url', value: p.webhook ? p.webhook.url : '', disabled: !admin, id: 'webhook-url' });
  const hookTimeout = h('input', { type: 'number', min: 1, value: p.webhook ? p.webhook.timeout_ms : 2000, disabled: !admin, id: 'webhook-timeout' });
  const offline = h('select', { disabled: !admin, id: 'offline-one-time' },
    h('option', { value: 'deny', selected: p.offline_one_time === 'deny' }, 'refuse one-time tokens without NATS'),
    h('option', { value: 'allow_local', selected: p.offline_one_time === 'allow_local' }, 'admit once per worker without NATS'));
  const save = async (ev) => {
    ev.preventDefault();
    const body = {
      publish: publish.read(), play: play.read(),
      totp: { period_secs: Number(period.value), digits: Number(digits.value) },
      jwt: { jwks_url: jwks.value || null },
      webhook: hook.value ? { url: hook.value, timeout_ms: Number(hookTimeout.value) } : null,
      offline_one_time: offline.value,
    };
    await attempt(() => api('PUT', `/v1/apps/${enc(appName)}/policy`, body), 'Policy saved');
  };
  const once = h('div', { id: 'secret-once' });
  const secretRow = (kind) => h('tr', {},
    h('td', {}, kind), h('td', {}, app.secrets.includes(kind) ? 'set' : 'not set'),
    h('td', {}, admin ? [
      h('button', { type: 'button', 'data-rotate': kind, onclick: async () => {
        const r = await attempt(() => api('POST', `/v1/apps/${enc(appName)}/secrets/${kind}`, {}));
        if (r) once.replaceChildren(h('div', { class: 'once', role: 'alert' }, h('p', {}, `The new ${kind} secret, shown once:`), shown('Secret', r.secret, 'secret-value')));
      } }, 'Rotate'), ' ',
      app.secrets.includes(kind) ? h('button', { type: 'button', class: 'quiet', onclick: async () => {
        if (await attempt(() => api('DELETE', `/v1/apps/${enc(appName)}/secrets/${kind}`), `${kind} secret removed`)) route();
      } }, 'Remove') : null,
    ] : h('span', { class: 'muted' }, 'admin only')));
  render(`App ${appName}`,
    h('p', {}, h('a', { href: `#/streams?app=${enc(appName)}` }, `Its ${app.streams} registered stream(s)`)),
    h('form', { id: 'policy', onsubmit: save },
      h('h2', {}, 'Policy'),
      admin ? null : h('p', { class: 'muted' }, 'Only an admin key may change the policy.'),
      publish.ui, play.ui,
      h('fieldset', {}, h('legend', {}, 'Credentials'),
        h('div', { class: 'inline' }, field('TOTP period (s)', period), field('TOTP digits', digits), field('JWKS URL (stream JWTs)', jwks))),
      h('fieldset', {}, h('legend', {}, 'Webhook'),
        h('div', { class: 'inline' }, field('URL (must be in SLUICE_WEBHOOK_ALLOWED)', hook), field('Timeout (ms)', hookTimeout))),
      h('fieldset', {}, h('legend', {}, 'Without NATS'), field('One-time tokens', offline)),
      admin ? h('button', { type: 'submit', id: 'policy-save' }, 'Save policy') : null),
    h('h2', {}, 'Secrets'),
    table('Secrets', ['Kind', 'State', ''], SECRETS.map(secretRow)),
    once,
    admin ? h('p', {}, h('button', { type: 'button', class: 'danger', id: 'delete-app', onclick: async () => {
      if (!confirm(`Delete app ${appName}, its streams and tokens?`)) return;
      if (await attempt(() => api('DELETE', `/v1/apps/${enc(appName)}`), `App ${appName} deleted`)) location.hash = '#/apps';
    } }, 'Delete app')) : null);
}

// ---- Streams --------------------------------------------------------------------------------

async function appPicker(params, target) {
  const { apps } = await api('GET', '/v1/apps');
  const chosen = params.get('app') || (apps[0] && apps[0].name) || '';
  const select = h('select', { id: 'app-picker', onchange: () => { location.hash = `#/${target}?app=${enc(select.value)}`; } },
    apps.map((a) => h('option', { value: a.name, selected: a.name === chosen }, a.name)));
  return { chosen, ui: field('App', select) };
}

async function streamsPage(params) {
  const picker = await appPicker(params, 'streams');
  const appName = picker.chosen;
  if (!appName) return render('Streams', h('p', {}, 'Create an app first.'));
  const { streams } = await api('GET', `/v1/apps/${enc(appName)}/streams?limit=1000`);
  const name = h('input', { id: 'new-stream-name', required: true });
  const publishName = h('input', { id: 'new-stream-publish-name' });
  const description = h('input', { id: 'new-stream-description' });
  const register = async (ev) => {
    ev.preventDefault();
    const body = { name: name.value };
    if (publishName.value) body.publish_name = publishName.value;
    if (description.value) body.description = description.value;
    if (await attempt(() => api('POST', `/v1/apps/${enc(appName)}/streams`, body), `Stream ${name.value} registered`)) {
      location.hash = `#/stream?app=${enc(appName)}&name=${enc(name.value)}`;
    }
  };
  render('Streams', h('div', { class: 'inline' }, picker.ui),
    can('write') ? h('form', { class: 'inline', id: 'new-stream', onsubmit: register },
      field('Stream name', name), field('Publish name (optional)', publishName), field('Description', description),
      h('button', { type: 'submit' }, 'Register stream')) : null,
    table(`Streams of ${appName}`, ['Stream', 'Publish name', 'Description', ''],
      streams.map((s) => h('tr', {},
        h('td', {}, h('a', { href: `#/stream?app=${enc(appName)}&name=${enc(s.name)}` }, s.name)),
        h('td', {}, s.publish_name || '—'), h('td', {}, s.description || ''),
        h('td', {}, can('write') ? h('button', { type: 'button', class: 'quiet', onclick: async () => {
          if (!confirm(`Delete stream ${s.name}?`)) return;
          if (await attempt(() => api('DELETE', `/v1/apps/${enc(appName)}/streams/${enc(s.name)}`), `Stream ${s.name} deleted`)) route();
        } }, 'Delete') : null))),
      'No stream registered.'));
}

// The URLs a client uses with an issued token.
function usage(appName, issued) {
  const base = S.rtmp.replace(/\/+$/, '');
  const rest = issued.rtmp_url.slice(base.length + 1 + appName.length + 1);
  const srt = `${S.srt.replace(/\/+$/, '')}?streamid=${issued.srt_streamid}`;
  const srtEncoded = `${S.srt.replace(/\/+$/, '')}?streamid=${enc(issued.srt_streamid)}`;
  const publish = issued.action === 'publish';
  return h('div', { class: 'once', id: 'token-once', role: 'alert' },
    h('p', {}, `A ${issued.action} token, usable once${issued.expires_at ? `, until ${when(issued.expires_at)}` : ''}. It is shown only now.`),
    shown('Token', issued.token, 'token-value'),
    h('h3', {}, 'OBS'), shown('Server', `${base}/${appName}`, 'obs-server'), shown('Stream key', rest, 'obs-key'),
    h('h3', {}, 'ffmpeg'),
    shown('RTMP URL', issued.rtmp_url, 'rtmp-url'),
    shown('Command', publish ? `ffmpeg -re -i INPUT -c copy -f flv '${issued.rtmp_url}'` : `ffplay '${issued.rtmp_url}'`, 'ffmpeg-line'),
    h('h3', {}, 'SRT'),
    shown('Stream id', issued.srt_streamid, 'srt-streamid'),
    shown('URL (ffmpeg, srt-live-transmit)', srt, 'srt-url'),
    shown('URL-encoded (VLC)', srtEncoded, 'srt-url-vlc'));
}

async function streamPage(params) {
  const appName = params.get('app');
  const name = params.get('name');
  const path = `/v1/apps/${enc(appName)}/streams/${enc(name)}`;
  const [stream, stats] = await Promise.all([api('GET', path), api('GET', `/v1/stats/streams/${enc(appName)}/${enc(name)}`)]);
  const write = can('write');
  const out = h('div', {});
  const actionSel = h('select', { id: 'token-action' }, h('option', { value: 'publish' }, 'publish'), h('option', { value: 'play' }, 'play'));
  const expires = h('input', { id: 'token-expires', type: 'number', min: 1, placeholder: 'never' });
  const issue = async (ev) => {
    ev.preventDefault();
    const body = { action: actionSel.value };
    if (expires.value) body.expires_in = Number(expires.value);
    const issued = await attempt(() => api('POST', `${path}/tokens`, body));
    if (issued) { out.replaceChildren(usage(appName, issued)); await drawTokens(); }
  };
  const tokens = h('div', { id: 'tokens' });
  const drawTokens = async () => {
    if (!write) return;
    const list = await api('GET', `${path}/tokens`);
    tokens.replaceChildren(table('Tokens', ['Id', 'Action', 'Expires', 'Status', ''],
      list.tokens.map((t) => h('tr', {}, h('td', {}, h('code', {}, t.id)), h('td', {}, t.action), h('td', {}, when(t.expires_at)),
        h('td', {}, t.status),
        h('td', {}, t.status === 'active' ? h('button', { type: 'button', class: 'quiet', onclick: async () => {
          if (await attempt(() => api('DELETE', `${path}/tokens/${enc(t.id)}`), 'Token revoked')) await drawTokens();
        } }, 'Revoke') : null))),
      'No token issued.'));
  };
  const editName = h('input', { id: 'edit-publish-name', value: stream.publish_name || '' });
  const editDescription = h('input', { id: 'edit-description', value: stream.description || '' });
  const save = async (ev) => {
    ev.preventDefault();
    // Empty clears (null), as the API's PATCH reads it.
    const body = { publish_name: editName.value || null, description: editDescription.value || null };
    if (await attempt(() => api('PATCH', path, body), 'Stream saved')) route();
  };
  const kick = (action, label) => h('button', { type: 'button', class: 'danger', 'data-kick': action || 'all', onclick: async () => {
    await attempt(() => api('POST', `${path}/kick`, action ? { action } : {}), `${label}: sent to every worker`);
  } }, label);
  render(`Stream ${appName}/${name}`,
    h('p', {}, stats.live ? h('span', { class: 'allow' }, `Live: ${stats.players} player(s), ${bits(stats.bitrate_10s)}`) : h('span', { class: 'muted' }, 'Not live.'),
      stream.publish_name ? ` Publish name: ${stream.publish_name}.` : ''),
    write ? h('p', {}, kick('publish', 'Kick the publisher'), ' ', kick('play', 'Kick the players')) : null,
    write ? h('form', { class: 'inline', id: 'edit-stream', onsubmit: save },
      field('Publish name (empty: none)', editName), field('Description', editDescription),
      h('button', { type: 'submit', class: 'quiet' }, 'Save stream')) : null,
    write ? h('form', { class: 'inline', id: 'issue-token', onsubmit: issue },
      field('Action', actionSel), field('Expires in (s)', expires), h('button', { type: 'submit' }, 'Issue token')) : null,
    out, tokens,
    h('p', {}, h('a', { href: `#/subscribers?app=${enc(appName)}&stream=${enc(name)}` }, 'TOTP subscribers of this stream')));
  await drawTokens();
}

// ---- Subscribers ----------------------------------------------------------------------------

async function subscribersPage(params) {
  const picker = await appPicker(params, 'subscribers');
  const appName = picker.chosen;
  if (!appName) return render('Subscribers', h('p', {}, 'Create an app first.'));
  const { streams } = await api('GET', `/v1/apps/${enc(appName)}/streams?limit=1000`);
  const streamName = params.get('stream') || (streams[0] && streams[0].name) || '';
  const streamSel = h('select', { id: 'stream-picker', onchange: () => { location.hash = `#/subscribers?app=${enc(appName)}&stream=${enc(streamSel.value)}`; } },
    streams.map((s) => h('option', { value: s.name, selected: s.name === streamName }, s.name)));
  if (!streamName) return render('Subscribers', h('div', { class: 'inline' }, picker.ui), h('p', {}, 'Register a stream first.'));
  if (!can('write')) return render('Subscribers', h('div', { class: 'inline' }, picker.ui, field('Stream', streamSel)), h('p', { class: 'muted' }, 'Subscribers are listed to write keys only.'));
  const path = `/v1/apps/${enc(appName)}/streams/${enc(streamName)}/subscribers`;
  const { subscribers } = await api('GET', path);
  const id = h('input', { id: 'new-subscriber-id', required: true });
  const action = h('select', { id: 'new-subscriber-action' }, h('option', { value: '' }, 'publish and play'),
    h('option', { value: 'publish' }, 'publish'), h('option', { value: 'play' }, 'play'));
  const out = h('div', {});
  const add = async (ev) => {
    ev.preventDefault();
    const body = { id: id.value };
    if (action.value) body.action = action.value;
    const added = await attempt(() => api('POST', path, body));
    if (!added) return;
    const svg = await attempt(() => fetch('/console/qr', { method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': S.csrf }, body: JSON.stringify({ text: added.otpauth_uri }) })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error('QR code not drawn')))));
    out.replaceChildren(h('div', { class: 'once', role: 'alert' },
      h('p', {}, `Subscriber ${added.id} added. Its secret is shown only now.`),
      shown('Secret (base32)', added.secret_b32, 'subscriber-secret'),
      shown('Provisioning URI', added.otpauth_uri, 'subscriber-uri'),
      svg ? h('p', { class: 'qr' }, h('img', { id: 'subscriber-qr', src: URL.createObjectURL(svg), alt: `QR code of the provisioning URI for ${added.id}` })) : null));
    await draw();
  };
  const list = h('div', {});
  const draw = async () => {
    const { subscribers: now } = await api('GET', path);
    list.replaceChildren(rows(now));
  };
  const rows = (subs) => table(`Subscribers of ${appName}/${streamName}`, ['Id', 'Action', 'Blocked until', ''],
    subs.map((s) => {
      const secs = h('input', { type: 'number', min: 0, value: 3600, 'aria-label': `Block ${s.id} for seconds`, size: 6 });
      return h('tr', {}, h('td', {}, s.id), h('td', {}, s.action || 'both'), h('td', {}, when(s.blocked_until)),
        h('td', {}, secs, ' ',
          h('button', { type: 'button', class: 'quiet', onclick: async () => {
            if (await attempt(() => api('POST', `${path}/${enc(s.id)}/block`, { seconds: Number(secs.value) }), `${s.id} blocked`)) await draw();
          } }, 'Block'), ' ',
          h('button', { type: 'button', class: 'quiet', onclick: async () => {
            if (await attempt(() => api('DELETE', `${path}/${enc(s.id)}`), `${s.id} removed`)) await draw();
          } }, 'Remove')));
    }), 'No subscriber.');
  list.replaceChildren(rows(subscribers));
  render('Subscribers', h('div', { class: 'inline' }, picker.ui, field('Stream', streamSel)),
    h('form', { class: 'inline', id: 'new-subscriber', onsubmit: add },
      field('Subscriber id', id), field('May', action), h('button', { type: 'submit' }, 'Add subscriber')),
    out, list);
}

// ---- Keys -----------------------------------------------------------------------------------

async function keysPage() {
  if (!can('admin')) return render('Keys', h('p', {}, 'Only an admin key may manage keys.'));
  const { keys } = await api('GET', '/v1/keys');
  const name = h('input', { id: 'new-key-name', required: true });
  const role = h('select', { id: 'new-key-role' }, ['read', 'write', 'admin'].map((r) => h('option', { value: r }, r)));
  const cidrs = h('input', { id: 'new-key-cidrs', placeholder: 'anywhere' });
  const out = h('div', {});
  const create = async (ev) => {
    ev.preventDefault();
    const body = { name: name.value, role: role.value, cidrs: cidrs.value.split(/[\s,]+/).filter(Boolean) };
    const created = await attempt(() => api('POST', '/v1/keys', body));
    if (!created) return;
    await keysPage();
    main().append(h('div', { class: 'once', role: 'alert' }, h('p', {}, `Key ${created.id} (${created.role}) created. Its secret is shown only now.`),
      shown('Secret', created.secret, 'key-secret')));
  };
  render('Keys',
    h('form', { class: 'inline', id: 'new-key', onsubmit: create },
      field('Name', name), field('Role', role), field('Client networks (CIDRs)', cidrs), h('button', { type: 'submit' }, 'Create key')),
    out,
    table('API keys', ['Id', 'Name', 'Role', 'Networks', 'Created', 'Last used', ''],
      keys.map((k) => h('tr', {}, h('td', {}, h('code', {}, k.id)), h('td', {}, k.name), h('td', {}, k.role),
        h('td', {}, k.cidrs.join(', ') || 'anywhere'), h('td', {}, when(k.created_at)), h('td', {}, when(k.last_used)),
        h('td', {}, k.revoked ? h('span', { class: 'muted' }, 'revoked') : h('button', { type: 'button', class: 'quiet', onclick: async () => {
          if (!confirm(`Revoke key ${k.id}?`)) return;
          if (await attempt(() => api('DELETE', `/v1/keys/${enc(k.id)}`), `Key ${k.id} revoked`)) await keysPage();
        } }, 'Revoke')))),
      'No key.'));
}

// ---- Live sessions --------------------------------------------------------------------------

async function sessionsPage() {
  const body = h('div', { id: 'sessions' });
  render('Live sessions', h('p', { class: 'muted' }, 'Per worker, from its heartbeat (every few seconds). A kick ends the sessions on every worker; a client that tries again is decided as usual.'), body);
  const draw = async () => {
    const [{ nodes }, { streams }] = await Promise.all([api('GET', '/v1/nodes'), api('GET', '/v1/stats/streams')]);
    const ids = [...new Set([...nodes.map((n) => n.node_id), ...streams.map((s) => s.node_id)])].sort();
    body.replaceChildren(...ids.map((node) => {
      const mine = streams.filter((s) => s.node_id === node);
      const kick = (s, action, label) => h('button', { type: 'button', class: 'danger', 'data-kick': `${s.app}/${s.stream}/${action}`, onclick: async () => {
        await attempt(() => api('POST', `/v1/apps/${enc(s.app)}/streams/${enc(s.stream)}/kick`, { action }), `${label} ${s.app}/${s.stream}: sent`);
      } }, label);
      return h('section', { class: 'panel' }, h('h2', {}, `Worker ${node}`),
        table(`Live on ${node}`, ['Stream', 'Publisher', 'Protocol', 'Players', 'Bitrate (1 s)', 'Uptime', ''],
          mine.map((s) => h('tr', {}, h('td', {}, `${s.app}/${s.stream}`), h('td', {}, s.publisher || '—'), h('td', {}, s.protocol),
            h('td', { class: 'num' }, s.players),
            h('td', { class: 'num' }, bits(s.bitrate_1s)), h('td', { class: 'num' }, `${s.uptime_secs} s`),
            h('td', {}, can('write') ? [kick(s, 'publish', 'Kick publisher'), ' ', kick(s, 'play', 'Kick players')] : null))),
          'Nothing live on this worker.'));
    }));
    if (!ids.length) body.replaceChildren(h('p', {}, 'No worker has sent a heartbeat.'));
  };
  await draw();
  every(2000, () => draw().catch(() => {}));
}

// ---- Decisions ------------------------------------------------------------------------------

function decisionRow(d) {
  const explainBtn = h('button', { type: 'button', class: 'quiet', 'data-explain': d.id, onclick: () => explain(d.id) }, 'Explain');
  return h('tr', { 'data-decision': d.id },
    h('td', {}, new Date(d.decided_at).toLocaleTimeString()), h('td', {}, d.node), h('td', {}, `${d.app}/${d.stream}`),
    h('td', {}, d.action), h('td', {}, d.protocol), h('td', {}, d.client_ip),
    h('td', { class: d.allowed ? 'allow' : 'deny' }, d.allowed ? 'allowed' : 'refused'),
    h('td', {}, d.reason, d.count > 1 ? ` ×${d.count}` : ''), h('td', {}, d.method || '—'), h('td', {}, d.subject || '—'),
    h('td', {}, explainBtn));
}

async function explain(id) {
  const box = document.getElementById('explain');
  const e = await attempt(() => api('GET', `/v1/decisions/${enc(id)}/explain`));
  if (!e) return;
  box.replaceChildren(h('section', { class: 'explain', 'aria-label': 'Explanation' },
    h('h2', {}, `Decision ${e.decision_id}`),
    h('dl', {},
      h('dt', {}, 'Request'), h('dd', {}, `${e.action} ${e.app}/${e.stream} from ${e.client_ip} on ${e.node || '?'}`),
      h('dt', {}, 'Verdict'), h('dd', { class: e.allowed ? 'allow' : 'deny' }, `${e.allowed ? 'allowed' : 'refused'} (${e.final_reason})`),
      h('dt', {}, 'Rule'), h('dd', { id: 'explain-rule' }, e.rule),
      h('dt', {}, 'State position'), h('dd', {}, `${e.state_position} (decision recorded at ${e.position})`),
      h('dt', {}, 'Replay'), h('dd', { id: 'explain-matches', class: e.matches ? 'allow' : 'deny' },
        e.matches ? 'matches: the rebuilt state decides the same' : `differs: recorded ${JSON.stringify(e.recorded)}, replayed ${JSON.stringify(e.replayed)}`),
      e.webhook ? [h('dt', {}, 'Webhook'), h('dd', {}, JSON.stringify(e.webhook))] : null)));
  box.querySelector('section').setAttribute('tabindex', '-1');
  box.querySelector('section').focus();
}

async function decisionsPage(params) {
  const inputs = {};
  const text = (key, label, attrs) => { inputs[key] = h('input', { id: `filter-${key}`, value: params.get(key) || '', ...(attrs || {}) }); return field(label, inputs[key]); };
  inputs.outcome = h('select', { id: 'filter-outcome' }, h('option', { value: '' }, 'any'), h('option', { value: 'allow', selected: params.get('outcome') === 'allow' }, 'allowed'),
    h('option', { value: 'deny', selected: params.get('outcome') === 'deny' }, 'refused'));
  const query = () => {
    const q = new URLSearchParams();
    for (const [k, el] of Object.entries(inputs)) {
      if (!el.value) continue;
      q.set(k, (k === 'since' || k === 'until') ? new Date(el.value).toISOString() : el.value);
    }
    return q;
  };
  const tbody = h('tbody', { id: 'decision-rows' });
  const live = h('input', { type: 'checkbox', id: 'tail' });
  const status = h('span', { class: 'muted', id: 'tail-status', 'aria-live': 'polite' });
  const load = async () => {
    const q = query();
    q.set('limit', '100');
    const page = await api('GET', `/v1/decisions?${q}`);
    tbody.replaceChildren(...page.decisions.map(decisionRow));
  };
  const tail = () => {
    if (S.tail) { S.tail.close(); S.tail = null; }
    if (!live.checked) { status.textContent = ''; return; }
    S.tail = new EventSource(`/v1/decisions/stream?${query()}`);
    S.tail.addEventListener('open', () => { status.textContent = 'following new decisions'; });
    S.tail.addEventListener('error', () => { status.textContent = 'reconnecting…'; });
    S.tail.addEventListener('decision', (ev) => {
      tbody.prepend(decisionRow(JSON.parse(ev.data)));
      while (tbody.children.length > 500) tbody.lastChild.remove();
    });
  };
  live.addEventListener('change', tail);
  const submit = async (ev) => { ev.preventDefault(); await attempt(load); tail(); };
  render('Decisions',
    h('form', { class: 'inline', id: 'decision-filters', onsubmit: submit },
      text('app', 'App'), text('stream', 'Stream'), text('ip', 'Address or CIDR'), text('reason', 'Reason'), text('node', 'Worker'),
      field('Outcome', inputs.outcome),
      text('since', 'Since', { type: 'datetime-local' }), text('until', 'Until', { type: 'datetime-local' }),
      h('button', { type: 'submit' }, 'Filter'), check('Live tail', live), status),
    h('div', { id: 'explain' }),
    h('div', { class: 'table-wrap' }, h('table', {}, h('caption', {}, 'Decisions, newest first'),
      h('thead', {}, h('tr', {}, ['Time', 'Worker', 'Stream', 'Action', 'Protocol', 'Address', 'Outcome', 'Reason', 'Method', 'Subject', ''].map((t) => h('th', { scope: 'col' }, t)))),
      tbody)));
  await load();
}

// ---- start ----------------------------------------------------------------------------------

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('signout').addEventListener('click', async () => {
    await attempt(() => api('DELETE', '/console/session'));
    signedOut('Signed out.');
  });
  try {
    const session = await fetch('/console/session', { credentials: 'same-origin', cache: 'no-store' });
    if (session.ok) return signedIn(await session.json());
  } catch (e) { /* not signed in */ }
  signedOut();
});
