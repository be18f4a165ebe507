#!/usr/bin/env bash
# Starts the real services the test suite talks to, on 127.0.0.1, and prints the environment
# variables that point the tests at them (eval the output). Idempotent: a running service is
# reused. Services live under $SYSSTATE_SERVICES_DIR (default /tmp/sysstate-services).
#
#   Azurite (Azure Blob emulator, npm `azurite`)      -> SYSSTATE_TEST_AZURE_URL
#   Garage  (S3, `cargo install garage`, 1 node, rf 1) -> SYSSTATE_TEST_S3_URL
set -euo pipefail

dir=${SYSSTATE_SERVICES_DIR:-/tmp/sysstate-services}
azurite_port=${SYSSTATE_AZURITE_PORT:-10000}
garage_s3_port=${SYSSTATE_GARAGE_PORT:-3900}
mkdir -p "$dir"
log() { echo "services: $*" >&2; }

wait_port() { # port, what, seconds
  for _ in $(seq 1 "$3"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 1
  done
  log "$2 did not open port $1 (log in $dir)"; return 1
}

# --- Azurite -------------------------------------------------------------------------------
if ! (exec 3<>"/dev/tcp/127.0.0.1/$azurite_port") 2>/dev/null; then
  mkdir -p "$dir/azurite"
  nohup azurite-blob --silent --skipApiVersionCheck --loose --location "$dir/azurite" --blobHost 127.0.0.1 --blobPort "$azurite_port" \
    >"$dir/azurite.log" 2>&1 &
  wait_port "$azurite_port" azurite 60
fi
python3 - "$azurite_port" <<'PY'
import sys
from azure.storage.blob import BlobServiceClient
from azure.core.exceptions import ResourceExistsError
conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        f"BlobEndpoint=http://127.0.0.1:{sys.argv[1]}/devstoreaccount1;")
for name in ("sysstate-test",):
    try:
        BlobServiceClient.from_connection_string(conn).create_container(name)
    except ResourceExistsError:
        pass
PY

# --- Garage --------------------------------------------------------------------------------
conf="$dir/garage.toml"
if [ ! -f "$conf" ]; then
  mkdir -p "$dir/garage/meta" "$dir/garage/data"
  cat >"$conf" <<TOML
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((garage_s3_port + 1))"
rpc_public_addr = "127.0.0.1:$((garage_s3_port + 1))"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$garage_s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((garage_s3_port + 3))"
admin_token = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
TOML
  chmod 600 "$conf"
fi
g() { garage -c "$conf" "$@"; }
if ! (exec 3<>"/dev/tcp/127.0.0.1/$garage_s3_port") 2>/dev/null; then
  nohup garage -c "$conf" server >"$dir/garage.log" 2>&1 &
  wait_port "$garage_s3_port" garage 60
fi
for _ in $(seq 1 30); do g status >/dev/null 2>&1 && break; sleep 1; done
if g status 2>/dev/null | grep -q "NO ROLE ASSIGNED"; then
  node=$(g node id -q | cut -d@ -f1)
  g layout assign -z dc1 -c 1G "$node" >&2
  g layout apply --version 1 >&2
fi
if [ ! -f "$dir/garage.key" ]; then
  for _ in $(seq 1 30); do g key create sysstate-test >"$dir/garage.key.tmp" 2>&1 && break; sleep 1; done
  mv "$dir/garage.key.tmp" "$dir/garage.key"
  g bucket create sysstate-test >&2 || true
  g bucket allow --read --write --owner sysstate-test --key sysstate-test >&2
fi
key_id=$(grep -Eo 'GK[0-9a-f]+' "$dir/garage.key" | head -n1)
secret=$(grep -Ei 'secret' "$dir/garage.key" | grep -Eo '[0-9a-f]{64}' | head -n1)
[ -n "$key_id" ] && [ -n "$secret" ] || { log "could not read Garage's key from $dir/garage.key"; cat "$dir/garage.key" >&2; exit 1; }

cat <<ENV
export SYSSTATE_TEST_AZURE_URL=az://sysstate-test
export AZURE_STORAGE_USE_EMULATOR=true
export AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$azurite_port
export SYSSTATE_TEST_S3_URL=s3://sysstate-test
export AWS_ACCESS_KEY_ID=$key_id
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_ENDPOINT=http://127.0.0.1:$garage_s3_port
export AWS_REGION=garage
export AWS_ALLOW_HTTP=true
ENV
