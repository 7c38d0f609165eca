// The mail lab's OAuth 2.0 authorization server: oidc-provider on 127.0.0.1 (plain http).
//
//   node server.mjs CONFIG.json
//
// CONFIG.json is written by lab/maillab/oauth.py (static for the life of the process):
//   { port, issuer, resource, scope, data_dir, settings_file, cookie_keys: [..],
//     clients: [ oidc-provider client metadata (+ "mailbox" for client-credentials clients) ],
//     resource_server_client: "<client id allowed to introspect for Dovecot>" }
// settings_file (JSON) is re-read on every use, so Python can change these without a restart:
//   { accounts: {"alice@example.test": "<lab password>", ...}, access_token_ttl: 3600,
//     rotate_refresh_tokens: true }
//
// Everything the provider stores (grants, sessions, refresh tokens, ...) goes to
// data_dir/store.json, so a stopped and restarted server (an identity-provider outage
// test) still honours the refresh tokens it issued.  Logs go to stdout (the lab sends
// them to workdir/logs/oidc.log): one line per request, never a token or a code.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import {
  existsSync, mkdirSync, readFileSync, renameSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { parse as parseForm, stringify as stringifyForm } from 'node:querystring';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function log(line) {
  process.stdout.write(`${new Date().toISOString()} ${line}\n`);
}

// ------------------------------------------------------------------ settings
function settings() {
  // tiny file, a handful of requests per test: re-reading it is cheaper than a watcher
  return JSON.parse(readFileSync(config.settings_file, 'utf8'));
}

// ------------------------------------------------------------------ file adapter
// One JSON file for every model, rewritten (temp file + rename) on each change: the
// lab issues a few hundred artifacts at most, and a synchronous rename means a
// SIGTERM never leaves half a file.  Keys are "<Model>:<id>" plus the same index
// entries the built-in memory adapter keeps (session uid, user code, grant members).
const storePath = join(config.data_dir, 'store.json');
const store = existsSync(storePath) ? JSON.parse(readFileSync(storePath, 'utf8')) : {};

function now() {
  return Math.floor(Date.now() / 1000);
}

function live(key) {
  const entry = store[key];
  if (!entry) return undefined;
  if (entry.exp && entry.exp <= now()) {
    delete store[key];
    return undefined;
  }
  return entry.value;
}

function persist() {
  for (const key of Object.keys(store)) live(key); // drop expired entries
  const tmp = `${storePath}.tmp`;
  writeFileSync(tmp, JSON.stringify(store), { mode: 0o600 });
  renameSync(tmp, storePath);
}

function put(key, value, expiresIn) {
  store[key] = { value, exp: expiresIn ? now() + expiresIn : undefined };
}

const GRANTABLE = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest']);

class FileAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (this.model === 'Session') put(`sessionUid:${payload.uid}`, id, expiresIn);
    if (payload.userCode) put(`userCode:${payload.userCode}`, id, expiresIn);
    if (GRANTABLE.has(this.model) && payload.grantId) {
      const members = live(`grant:${payload.grantId}`) || [];
      members.push(key);
      // the grant index lives as long as its longest-lived member
      const old = store[`grant:${payload.grantId}`]?.exp;
      const exp = expiresIn ? now() + expiresIn : undefined;
      store[`grant:${payload.grantId}`] = {
        value: members, exp: old === undefined || exp === undefined ? undefined : Math.max(old, exp),
      };
    }
    put(key, payload, expiresIn);
    persist();
  }

  async find(id) {
    return live(this.key(id));
  }

  async findByUid(uid) {
    const id = live(`sessionUid:${uid}`);
    return id ? this.find(id) : undefined;
  }

  async findByUserCode(userCode) {
    const id = live(`userCode:${userCode}`);
    return id ? this.find(id) : undefined;
  }

  async consume(id) {
    const value = live(this.key(id));
    if (value) {
      value.consumed = now();
      persist();
    }
  }

  async destroy(id) {
    delete store[this.key(id)];
    persist();
  }

  async revokeByGrantId(grantId) { // eslint-disable-line class-methods-use-this
    for (const key of live(`grant:${grantId}`) || []) delete store[key];
    delete store[`grant:${grantId}`];
    persist();
  }
}

// ------------------------------------------------------------------ keys
// The signing key (only used for ID tokens; the mail access tokens are opaque) is made on
// the first start and kept in data_dir, so a restart does not invalidate anything.  EC P-256
// only: an RSA key would cost 0.1-0.4 s of every first lab start.
function signingKeys() {
  const path = join(config.data_dir, 'jwks.json');
  if (existsSync(path)) return JSON.parse(readFileSync(path, 'utf8'));
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  const jwks = { keys: [{ ...ec, kid: randomUUID(), use: 'sig', alg: 'ES256' }] };
  writeFileSync(path, JSON.stringify(jwks), { mode: 0o600 });
  return jwks;
}

// ------------------------------------------------------------------ provider
mkdirSync(config.data_dir, { recursive: true });
const clientsById = Object.fromEntries(config.clients.map((c) => [c.client_id, c]));

function resourceServerInfo() {
  const ttl = settings().access_token_ttl;
  // A resource scope is not an OpenID scope: declared here, it survives the
  // refresh_token grant (an access token from a refresh still has scope "mail").
  return {
    scope: config.scope, audience: config.resource, accessTokenFormat: 'opaque', accessTokenTTL: ttl,
  };
}

const provider = new Provider(config.issuer, {
  adapter: FileAdapter,
  clients: config.clients,
  clientDefaults: { id_token_signed_response_alg: 'ES256' },   // the one key is EC
  enabledJWA: { idTokenSigningAlgValues: ['ES256'] },
  jwks: signingKeys(),
  cookies: { keys: config.cookie_keys },
  extraClientMetadata: { properties: ['mailbox'] },
  // RFC 8252 §7.3 (any port on a loopback redirect URI) is built in: native clients
  // registered with http://127.0.0.1/callback accept http://127.0.0.1:<port>/callback.
  scopes: ['openid', 'offline_access'],
  claims: { openid: ['sub'], email: ['email'] },
  async findAccount(ctx, sub) {
    if (!Object.hasOwn(settings().accounts, sub)) return undefined;
    return { accountId: sub, claims: async () => ({ sub, email: sub }) };
  },
  features: {
    devInteractions: { enabled: true },      // login and consent pages (login checked below)
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: {
      enabled: true,
      // Dovecot's client sees access tokens only: introspection of a refresh token
      // would otherwise say active: true, and a refresh token sent as a bearer
      // token would log in.  Other confidential clients see their tokens of any kind.
      async allowedPolicy(ctx, client, token) {
        if (client.clientId === config.resource_server_client) {
          return token.kind === 'AccessToken' || token.kind === 'ClientCredentials';
        }
        return client.clientAuthMethod !== 'none' || token.clientId === client.clientId;
      },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => config.resource,
      useGrantedResource: async () => true,
      async getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== config.resource) throw new errors.InvalidTarget();
        return resourceServerInfo();
      },
    },
  },
  // the mailbox a token is good for: the account for user tokens, the client's bound
  // mailbox for client_credentials tokens (they have no sub).  Dovecot's
  // username_attribute.  Introspection returns every extra claim.
  async extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials') {
      return { mailbox: clientsById[token.clientId]?.mailbox };
    }
    return token.accountId ? { mailbox: token.accountId } : undefined;
  },
  rotateRefreshToken: () => settings().rotate_refresh_tokens,
  ttl: {
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL || settings().access_token_ttl,
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL
      || settings().access_token_ttl,
    AuthorizationCode: 60,
    Interaction: 600,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
    RefreshToken: 14 * 24 * 3600,
    IdToken: 3600,
  },
  expiresWithSession: async () => false,
  clientBasedCORS: () => false,   // no browser clients in the lab
  responseTypes: ['code'],        // authorization code only (no implicit grant)
});

// RFC 6749 providers such as Microsoft issue a refresh token whenever offline_access is
// asked for.  oidc-provider follows OpenID Connect and drops offline_access unless the
// request also has prompt=consent: add it, so apps need not know about that rule.
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/auth') {
    const query = { ...ctx.query };
    const scopes = String(query.scope || '').split(' ');
    const prompts = String(query.prompt || '').split(' ').filter(Boolean);
    if (scopes.includes('offline_access') && !prompts.includes('consent') && !prompts.includes('none')) {
      query.prompt = [...prompts, 'consent'].join(' ');
      ctx.query = query;
    }
  }
  const t0 = Date.now();
  try {
    await next();
  } finally {
    // path only (no query string), the client and the outcome: never a token or a code
    const o = ctx.oidc;
    const parts = [ctx.method, ctx.path, ctx.status, `${Date.now() - t0}ms`];
    if (o?.client) parts.push(`client=${o.client.clientId}`);
    if (o?.params?.grant_type) parts.push(`grant_type=${o.params.grant_type}`);
    if (o?.route === 'introspection' && ctx.body && typeof ctx.body === 'object') {
      parts.push(`active=${ctx.body.active}`);
      const kind = ['AccessToken', 'ClientCredentials', 'RefreshToken'].find((k) => o.entities?.[k]);
      if (kind) parts.push(`kind=${kind}`);
    }
    if (ctx.state.note) parts.push(ctx.state.note);
    if (ctx.body && typeof ctx.body === 'object' && ctx.body.error) {
      parts.push(`error=${ctx.body.error}`);
      if (ctx.body.error_description) parts.push(JSON.stringify(ctx.body.error_description));
    }
    log(parts.join(' '));
  }
});

// The dev login page accepts any login and password, and an unknown login ends in a 500 once
// findAccount finds nothing.  Check both against the lab's users first: "alice" or
// "alice@example.test" (made the account id, as the mail servers do) with the lab password.
const MAX_FORM = 64 * 1024;
async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM) throw new errors.InvalidRequest('form too large');
    chunks.push(chunk);
  }
  return parseForm(Buffer.concat(chunks).toString('utf8'));
}

provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)
      && ctx.is('application/x-www-form-urlencoded')) {
    const form = await readForm(ctx.req);
    if (form.prompt === 'login') {
      const { accounts } = settings();
      const login = String(form.login || '');
      const id = Object.hasOwn(accounts, login) ? login
        : Object.keys(accounts).find((a) => a.split('@')[0] === login);
      if (!id || accounts[id] !== form.password) {
        ctx.state.note = 'login refused: unknown account or wrong password';
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = '<!DOCTYPE html><title>Sign-in failed</title>'
          + '<p>maillab: unknown account or wrong password. Go back and try again.</p>';
        return;
      }
      form.login = id;
    }
    // oidc-provider takes an already read body from here (it logs a one-time notice)
    ctx.request.body = stringifyForm(form);
  }
  await next();
});

provider.on('server_error', (ctx, err) => log(`server_error ${err.name}: ${err.message}`));
// why a request failed (error_detail names the rule, e.g. a reused rotated refresh token);
// these texts carry no token values
for (const event of ['grant.error', 'authorization.error', 'introspection.error', 'revocation.error']) {
  provider.on(event, (ctx, err) => log(`${event} ${err.error || err.name}: ${err.error_detail || err.message}`));
}

const server = provider.listen(config.port, '127.0.0.1', () => {
  log(`listening on ${config.issuer} (oidc-provider, node ${process.version})`);
});
server.on('error', (err) => {
  log(`fatal: ${err.message}`);
  process.exit(1);
});
// the lab stops us with SIGTERM: the store is written synchronously, nothing to flush
process.on('SIGTERM', () => process.exit(0));
