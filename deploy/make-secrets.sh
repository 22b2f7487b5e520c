#!/usr/bin/env bash
# Creates the secrets every shipped deployment needs (compose, Kubernetes, a bare `docker run`):
#
#   backend-token     the token the gateway sends to the retriever and the rankers
#                     ([gateway] backend_token_file, [retriever]/[ranker] auth_token_file)
#   client-tokens     tokens callers send to the gateway, one per line ([gateway.auth] tokens_file)
#   redis-password    Redis `requirepass` ([gateway.store] password_file)
#   admin-tokens      operators' tokens for the Reload RPCs of the retriever and the rankers, one
#                     per line ([retriever]/[ranker] admin_tokens_file; mounted into those model
#                     services only, never the gateway or Redis, so a gateway compromise cannot
#                     swap models)
#   ca.crt            a private CA (ca.key beside it stays here: it is not mounted anywhere)
#   backend.crt/.key  the retriever's and the rankers' certificate, for the names the gateway
#                     dials (`retriever`, `ranker`) and `localhost` (the containers' own
#                     HEALTHCHECK); [retriever.tls], [ranker.tls]
#   gateway.crt/.key  the gateway's certificate (`gateway`, `gateway.llamarec.svc`, `localhost`,
#                     127.0.0.1); [gateway.tls]
#
# Usage: deploy/make-secrets.sh [DIR]        (default deploy/secrets, git-ignored)
#        deploy/make-secrets.sh --k8s [DIR]  also creates the Kubernetes Secrets from DIR in
#                                            namespace llamarec (kubectl, current context)
#
# Existing files are kept (re-running only fills in what is missing), so rotating a secret is:
# delete its file, re-run, re-create the Secret, restart the pods. Needs openssl.
set -euo pipefail

k8s=false
if [[ "${1:-}" == "--k8s" ]]; then
  k8s=true
  shift
fi
dir="${1:-$(dirname "$0")/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 077
command -v openssl >/dev/null || { echo "make-secrets: openssl is needed" >&2; exit 1; }

# A random token: letters and digits only, never all digits (tokens that read as numbers are
# refused, see common/src/auth.rs check_token).
token() { printf 'llr-%s\n' "$(openssl rand -hex 24)"; }

[[ -s backend-token ]] || token > backend-token
[[ -s client-tokens ]] || { echo "# callers of the gateway, one token per line"; token; } > client-tokens
[[ -s redis-password ]] || token > redis-password
[[ -s admin-tokens ]] || { echo "# operators allowed to call Reload (llamarec reload --admin-token), one per line"; token; } > admin-tokens

if [[ ! -s ca.crt || ! -s ca.key ]]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=llamarec private CA" \
    -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# leaf NAME SUBJECT_ALT_NAMES: a certificate NAME.crt/NAME.key signed by the CA.
leaf() {
  local name=$1 sans=$2
  [[ -s $name.crt && -s $name.key ]] && return
  openssl req -newkey rsa:3072 -nodes -subj "/CN=llamarec $name" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' "$sans" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
leaf backend "DNS:retriever,DNS:ranker,DNS:retriever.llamarec.svc,DNS:ranker.llamarec.svc,DNS:localhost"
leaf gateway "DNS:gateway,DNS:gateway.llamarec.svc,DNS:localhost,IP:127.0.0.1"
# The services run as non-root users other than the one running this script (compose bind-mounts
# these files as they are): readable, while the directory itself stays private.
chmod 644 ./*.crt backend-token client-tokens redis-password admin-tokens backend.key gateway.key
chmod 600 ca.key
echo "secrets in $(pwd)"

if $k8s; then
  ns=llamarec
  kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
  apply() { kubectl -n "$ns" create secret "$@" --dry-run=client -o yaml | kubectl apply -f -; }
  apply generic llamarec-backend-token --from-file=token=backend-token
  apply generic llamarec-client-tokens --from-file=tokens=client-tokens
  apply generic llamarec-redis --from-file=password=redis-password
  apply generic llamarec-admin-tokens --from-file=tokens=admin-tokens
  apply generic llamarec-backend-tls --from-file=ca.crt=ca.crt --from-file=tls.crt=backend.crt --from-file=tls.key=backend.key
  apply generic llamarec-gateway-tls --from-file=ca.crt=ca.crt --from-file=tls.crt=gateway.crt --from-file=tls.key=gateway.key
fi
