// The OpenID Connect provider the tests start (tests/idp.py starts it; never shipped).
//
// oidc-provider 9.13.3 with: authorization code + PKCE (S256, required), the RFC 9207 `iss`
// response parameter, RP-initiated and back-channel logout, dynamic client registration (the
// gateway's port differs per test), a client-credentials robot getting RFC 9068 JWT access
// tokens (typ at+jwt) for the resource urn:mlflow-guard, a groups claim in the ID token, and
// a few test-only admin endpoints under /test/ (Bearer ADMIN_TOKEN): key rotation, account
// changes, failure injection, JWKS fetch counts, back-channel logout on demand, events.
//
// Environment: PORT (required), ISSUER (default http://localhost:PORT; use localhost, not
// 127.0.0.1, so its cookies do not mix with a gateway on 127.0.0.1), HOST (default 127.0.0.1),
// ADMIN_TOKEN (also the initial access token for /reg), ROBOT_SECRET, IDP_ACCOUNTS (JSON
// {"<id>": {claims}}), IDP_JWKS (a private JWK set; default three fresh RSA keys), IDP_PUBLISHED
// (kids in /jwks at start, default the first key, which signs), ALLOW_LOOPBACK_FETCH (default 1;
// 0 shows oidc-provider's SSRF guard silently dropping back-channel logout to 127.0.0.1).
// Prints one line "ready" on stdout when it listens.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';
// No "exports" map in the package: the provider's private state (keystore, published JWKS)
// is reachable for the key-rotation endpoint. Tests only.
import instance from 'oidc-provider/lib/helpers/weak_cache.js';

const PORT = Number(process.env.PORT);
if (!PORT) throw new Error('PORT is required');
const HOST = process.env.HOST ?? '127.0.0.1';
const ISSUER = process.env.ISSUER ?? `http://localhost:${PORT}`;
const ADMIN_TOKEN = process.env.ADMIN_TOKEN ?? 'test-admin-token';
const ROBOT_SECRET = process.env.ROBOT_SECRET ?? 'robot-secret';
const RESOURCE = 'urn:mlflow-guard';
const RESOURCE_SCOPE = 'mlflow:read mlflow:write';
const ALLOW_LOOPBACK_FETCH = process.env.ALLOW_LOOPBACK_FETCH !== '0';

function generateKeys() {
  const rsa = (kid) => ({
    ...crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
    kid,
    use: 'sig',
  });
  return [rsa('key-1'), rsa('key-2'), rsa('key-3')];
}

const KEYS = process.env.IDP_JWKS ? JSON.parse(process.env.IDP_JWKS).keys : generateKeys();
const PUBLIC_FIELDS = ['kty', 'kid', 'use', 'alg', 'n', 'e', 'crv', 'x', 'y'];
const publicJwk = (jwk) => Object.fromEntries(
  PUBLIC_FIELDS.filter((name) => jwk[name] !== undefined).map((name) => [name, jwk[name]]),
);
const keyState = {
  signingKid: KEYS[0].kid,
  published: (process.env.IDP_PUBLISHED ?? KEYS[0].kid).split(',').filter(Boolean),
  accessTokenAlg: 'RS256',
};

// Accounts: the login name typed on the dev login page (any password) is the account id and
// `sub`; IDP_ACCOUNTS ({"<id>": {claims}}, tests/idp.py ACCOUNTS) gives their claims. Unknown
// names log in too, with preferred_username = the name and no groups.
const ACCOUNTS = new Map(Object.entries(JSON.parse(process.env.IDP_ACCOUNTS ?? '{}')));

function accountClaims(id) {
  return ACCOUNTS.get(id) ?? { preferred_username: id, groups: [] };
}

const events = [];
const sessionsSeen = []; // {client_id, sub, sid} from every ID token issued
const jwksFetches = { count: 0 };
let failure = null; // {paths: [...], status, delay}

function record(type, detail) {
  events.push({ type, at: Date.now() / 1000, ...detail });
  if (events.length > 1000) events.shift();
}

function decodePayload(jwt) {
  return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
}

const configuration = {
  clients: [
    {
      client_id: 'mlflow-robot',
      client_secret: ROBOT_SECRET,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      groups: ['ci-pipelines'],
    },
  ],
  jwks: { keys: KEYS },
  cookies: { keys: ['test-idp-cookie-key'] },
  extraClientMetadata: {
    // A client's groups land in its client-credentials access tokens (bearer groups_claim).
    properties: ['groups'],
    validator(ctx, key, value) {
      if (key === 'groups' && value !== undefined && !(Array.isArray(value) && value.every((g) => typeof g === 'string'))) {
        throw new Error('groups must be an array of strings');
      }
    },
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, ...accountClaims(id) };
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  // groups and email in the ID token itself, not only from userinfo.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  responseTypes: ['code'],
  // First-party: no consent page; the requested scopes are granted at login.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const existing = await ctx.oidc.provider.Grant.find(grantId);
      if (existing) return existing;
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope([...ctx.oidc.requestParamScopes].join(' '));
    await grant.save();
    return grant;
  },
  // Refresh tokens whenever the client may use them (no offline_access dance).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Every refresh rotates the refresh token, and a used one presented again revokes the whole
  // grant (reuse detection, as Keycloak, Okta and Auth0 do): two replicas refreshing the same
  // session at once log the person out.
  rotateRefreshToken: true,
  async extraTokenClaims(ctx, token) {
    if (token.kind !== 'ClientCredentials') return undefined;
    const client = await ctx.oidc.provider.Client.find(token.clientId);
    return client?.groups ? { groups: client.groups } : undefined;
  },
  ttl: {
    AccessToken: 600,
    AuthorizationCode: 60,
    ClientCredentials: 600,
    Grant: 3600,
    IdToken: 600,
    Interaction: 600,
    RefreshToken: 86400,
    Session: 86400,
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    backchannelLogout: { enabled: true },
    registration: {
      enabled: true,
      initialAccessToken: ADMIN_TOKEN,
      issueRegistrationAccessToken: false,
    },
    resourceIndicators: {
      enabled: true,
      useGrantedResource: () => true,
      // Only client credentials default to the resource: an auth-code access token bound to a
      // resource is a JWT that userinfo (/me) refuses.
      defaultResource: (ctx) => (ctx.oidc.params?.grant_type === 'client_credentials' ? RESOURCE : undefined),
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: RESOURCE_SCOPE,
        audience: resourceIndicator,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
        jwt: { sign: { alg: keyState.accessTokenAlg, kid: keyState.signingKid } },
      }),
    },
  },
  // oidc-provider's own fetch goes through an SSRF-guarded dispatcher that drops 127.0.0.0/8:
  // back-channel logout to a gateway on loopback would silently never arrive.
  ...(ALLOW_LOOPBACK_FETCH ? { fetch: (url, { dispatcher, ...options }) => globalThis.fetch(url, options) } : {}),
};

const provider = new Provider(ISSUER, configuration);

provider.on('backchannel.success', (ctx, client, accountId, sid) => {
  record('backchannel.success', { client_id: client.clientId, sub: accountId, sid });
});
provider.on('backchannel.error', (ctx, error, client, accountId, sid) => {
  record('backchannel.error', { client_id: client.clientId, sub: accountId, sid, error: String(error?.message ?? error) });
});
provider.on('grant.success', (ctx) => {
  const idToken = ctx.body?.id_token;
  if (typeof idToken === 'string') {
    const claims = decodePayload(idToken);
    sessionsSeen.push({ client_id: claims.aud, sub: claims.sub, sid: claims.sid });
    if (sessionsSeen.length > 1000) sessionsSeen.shift();
  }
  record('grant.success', { client_id: ctx.oidc.client?.clientId });
});
provider.on('end_session.success', (ctx) => record('end_session.success', { client_id: ctx.oidc.client?.clientId }));
provider.on('server_error', (ctx, error) => record('server_error', { error: String(error?.stack ?? error) }));

function applyKeys() {
  const byKid = new Map(KEYS.map((key) => [key.kid, key]));
  const signing = byKid.get(keyState.signingKid);
  const { keystore } = instance(provider);
  keystore.clear();
  // The signing key first: ID and logout tokens take the first key of the needed type.
  keystore.add(structuredClone(signing));
  for (const key of KEYS) if (key.kid !== signing.kid) keystore.add(structuredClone(key));
  instance(provider).jwks = { keys: keyState.published.map((kid) => publicJwk(byKid.get(kid))) };
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString() || '{}';
  return JSON.parse(text);
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function admin(req, res, path) {
  if (req.headers.authorization !== `Bearer ${ADMIN_TOKEN}`) return send(res, 401, { error: 'admin token' });
  const body = req.method === 'POST' ? await readJson(req) : {};
  switch (`${req.method} ${path}`) {
    case 'POST /test/keys': {
      const kids = new Set(KEYS.map((key) => key.kid));
      const signing = body.signing_kid ?? keyState.signingKid;
      const published = body.published_kids ?? keyState.published;
      if (!kids.has(signing) || !published.every((kid) => kids.has(kid))) {
        return send(res, 400, { error: `unknown kid (known: ${[...kids].join(', ')})` });
      }
      keyState.signingKid = signing;
      keyState.published = published;
      keyState.accessTokenAlg = body.access_token_alg ?? keyState.accessTokenAlg;
      applyKeys();
      return send(res, 200, keyState);
    }
    case 'POST /test/accounts': {
      // {id, claims}: create or replace an account (rename, group changes, email_verified).
      ACCOUNTS.set(body.id, body.claims);
      return send(res, 200, { id: body.id, claims: body.claims });
    }
    case 'POST /test/failure': {
      // {paths: ["/jwks", ...] or [] for none, delay (seconds), status (0: drop the connection;
      // absent: answer normally after the delay)}
      failure = body.paths?.length ? body : null;
      return send(res, 200, { failure });
    }
    case 'POST /test/backchannel-logout': {
      // {client_id, sub, sid?}: the provider sends that client a logout token now.
      const client = await provider.Client.find(body.client_id);
      if (!client) return send(res, 404, { error: 'unknown client' });
      const sid = body.sid ?? sessionsSeen.findLast(
        (s) => s.client_id === body.client_id && s.sub === body.sub,
      )?.sid;
      try {
        await client.backchannelLogout(body.sub, sid);
        record('backchannel.success', { client_id: body.client_id, sub: body.sub, sid });
        return send(res, 200, { sent: true, sid });
      } catch (error) {
        record('backchannel.error', { client_id: body.client_id, sub: body.sub, sid, error: String(error?.message ?? error) });
        return send(res, 502, { sent: false, sid, error: String(error?.message ?? error) });
      }
    }
    case 'GET /test/events':
      return send(res, 200, { events, sessions: sessionsSeen, jwks_fetches: jwksFetches.count });
    default:
      return send(res, 404, { error: 'no such admin endpoint' });
  }
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, ISSUER).pathname;
  try {
    if (path.startsWith('/test/')) return await admin(req, res, path);
  } catch (error) {
    return send(res, 500, { error: String(error?.stack ?? error) });
  }
  if (path === '/jwks') jwksFetches.count += 1;
  if (failure && failure.paths.includes(path)) {
    if (failure.delay) await new Promise((resolve) => { setTimeout(resolve, failure.delay * 1000); });
    if (failure.status === 0) return req.socket.destroy();
    if (failure.status) return send(res, failure.status, { error: 'injected failure' });
  }
  return callback(req, res);
});

applyKeys();
server.listen(PORT, HOST, () => {
  process.stdout.write('ready\n');
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
