"""Assertions on the Helm chart's rendered manifests (called by scripts/test-chart.sh).

usage: chart_assertions.py RENDER_DIR BIN_DIR
RENDER_DIR holds default.yaml, scaled.yaml (examples/scaled.yaml), more-drafts.yaml
(default values with draft.replicas=7) and tls.yaml (examples/tls.yaml); BIN_DIR the built service binaries, whose --help
must know every flag the chart passes.
"""
import os
import subprocess
import sys

import yaml


def load(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(deploy):
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def flag(args, name):
    return args[args.index(name) + 1]


def main():
    render, bins = sys.argv[1], sys.argv[2]
    default = load(os.path.join(render, "default.yaml"))
    scaled = load(os.path.join(render, "scaled.yaml"))
    more = load(os.path.join(render, "more-drafts.yaml"))
    tls = load(os.path.join(render, "tls.yaml"))
    dep = lambda m, c: m[("Deployment", f"demo-ouroboros-{c}")]
    svc = lambda m, c: m[("Service", f"demo-ouroboros-{c}")]
    components = ["orchestrator", "draft", "target"]

    # Scaling the draft pool touches nothing of the target.
    assert dep(more, "draft")["spec"]["replicas"] == 7
    assert dep(more, "target") == dep(default, "target"), "draft replicas changed the target"
    assert svc(more, "target") == svc(default, "target")
    assert dep(more, "orchestrator") == dep(default, "orchestrator")

    # GPU requests follow the tensor-parallel size; CPU by default.
    t = container(dep(scaled, "target"))
    tp = int(flag(t["args"], "--tp"))
    assert tp == 2
    assert t["resources"]["limits"]["nvidia.com/gpu"] == tp
    assert t["resources"]["requests"]["nvidia.com/gpu"] == tp
    assert t["resources"]["limits"]["memory"] == "32Gi"
    for c in components:
        for m in (default, more):
            r = container(dep(m, c))["resources"]
            assert "nvidia.com/gpu" not in r.get("limits", {}), c
    # GPU targets run on CUDA from the CUDA image; everything else from the CPU image.
    assert flag(t["args"], "--device") == "cuda"
    assert t["image"].endswith("-cuda")
    assert container(dep(scaled, "draft"))["image"] == t["image"].removesuffix("-cuda")
    assert "--device" not in container(dep(default, "target"))["args"]
    assert not container(dep(default, "target"))["image"].endswith("-cuda")
    assert dep(scaled, "target")["spec"]["replicas"] == 2
    assert dep(scaled, "target")["spec"]["template"]["spec"]["tolerations"]

    # Autoscaled draft: an HPA owns the replica count.
    hpa = scaled[("HorizontalPodAutoscaler", "demo-ouroboros-draft")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-ouroboros-draft"
    assert hpa["spec"]["minReplicas"] == 4
    assert "replicas" not in dep(scaled, "draft")["spec"]
    assert ("HorizontalPodAutoscaler", "demo-ouroboros-target") not in scaled

    for m in (default, scaled):
        for c in components:
            d, s = dep(m, c), svc(m, c)
            spec = d["spec"]["template"]["spec"]
            ct = container(d)
            port = ct["ports"][0]["containerPort"]
            # gRPC health probes on the serving port, with a long startup budget.
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert ct[p]["grpc"]["port"] == port, (c, p)
            start = ct["startupProbe"]
            assert start["periodSeconds"] * start["failureThreshold"] >= 300, c
            # Graceful drain: a pause before SIGTERM, and time to finish sessions.
            assert ct["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
            if c != "orchestrator":
                drain = int(flag(ct["args"], "--drain-timeout-s"))
                assert spec["terminationGracePeriodSeconds"] > drain, c
            # Selectors pick this component only.
            sel = d["spec"]["selector"]["matchLabels"]
            assert sel["app.kubernetes.io/component"] == c
            assert s["spec"]["selector"] == sel
            assert m[("PodDisruptionBudget", f"demo-ouroboros-{c}")]["spec"]["selector"]["matchLabels"] == sel
            # Prometheus metrics on a port of their own, announced for scraping.
            assert flag(ct["args"], "--metrics-listen") == "0.0.0.0:9090", c
            assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in ct["ports"]
            assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"
            # Every pod sees the model volume where the args point.
            mounts = {v["name"]: v["mountPath"] for v in ct["volumeMounts"]}
            assert mounts["models"] == "/models"
        # Draft and target are headless so clients see every pod; the API is not.
        assert svc(m, "draft")["spec"]["clusterIP"] == "None"
        assert svc(m, "target")["spec"]["clusterIP"] == "None"
        assert "clusterIP" not in svc(m, "orchestrator")["spec"]
        o = container(dep(m, "orchestrator"))["args"]
        assert flag(o, "--target-endpoint") == "http://demo-ouroboros-target:50052"
        assert flag(o, "--draft-endpoint") == "http://demo-ouroboros-draft:50053"
        # The OpenAI-compatible HTTP API on its own port, in the pod and the Service.
        assert flag(o, "--http-listen") == "0.0.0.0:8000"
        ports = {p["name"]: p["containerPort"] for p in container(dep(m, "orchestrator"))["ports"]}
        assert ports["http"] == 8000, ports
        assert {p["name"]: p["port"] for p in svc(m, "orchestrator")["spec"]["ports"]}["http"] == 8000
        assert "http" not in {p["name"] for p in container(dep(m, "target"))["ports"]}
        # The orchestrator tokenizes with the target file's own tokenizer unless told.
        assert flag(o, "--tokenizer") == flag(container(dep(m, "target"))["args"], "--model")

    # Models: fetched by an init container into an emptyDir by default, a shared claim
    # without fetching in the scaled example.
    volume = lambda spec, name: next(v for v in spec["volumes"] if v["name"] == name)
    spec = dep(default, "target")["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["command"] == ["/app/scripts/fetch-models.sh"]
    assert volume(spec, "models") == {"name": "models", "emptyDir": {}}
    spec = dep(scaled, "target")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    assert volume(spec, "models")["persistentVolumeClaim"]["claimName"] == "ouroboros-models"

    # Every container runs non-root on a read-only root filesystem, without privilege
    # escalation or capabilities, under the runtime's default seccomp profile; /tmp is an
    # emptyDir (pip and the fetch script write there).
    for m in (default, scaled):
        for c in components:
            spec = dep(m, c)["spec"]["template"]["spec"]
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert volume(spec, "tmp") == {"name": "tmp", "emptyDir": {}}
            for ct in spec["containers"] + spec.get("initContainers", []):
                sc = ct["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, (c, ct["name"])
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert {"name": "tmp", "mountPath": "/tmp"} in ct["volumeMounts"], (c, ct["name"])

    # Only orchestrator pods reach draft and target on their gRPC ports; metrics stay open.
    for c, port in (("draft", 50053), ("target", 50052)):
        np = default[("NetworkPolicy", f"demo-ouroboros-{c}")]["spec"]
        assert np["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == c
        assert np["policyTypes"] == ["Ingress"]
        grpc_rule, metrics_rule = np["ingress"]
        (src,) = grpc_rule["from"]
        assert src["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "orchestrator"
        assert grpc_rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert "from" not in metrics_rule and metrics_rule["ports"][0]["port"] == 9090
    assert ("NetworkPolicy", "demo-ouroboros-orchestrator") not in default

    # Observability options: off by default; the scaled example scrapes every component
    # through a ServiceMonitor on its Service's metrics port and traces to a collector,
    # each component under its own service name.
    assert not [k for k in default if k[0] == "ServiceMonitor"]
    for c in components:
        env = {e["name"] for e in container(dep(default, c))["env"]}
        assert not [e for e in env if e.startswith("OTEL_")], c
        sm = scaled[("ServiceMonitor", f"demo-ouroboros-{c}")]
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        sel = sm["spec"]["selector"]["matchLabels"]
        labels = svc(scaled, c)["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sel.items()), c
        assert sel["app.kubernetes.io/component"] == c
        (ep,) = sm["spec"]["endpoints"]
        assert ep["port"] == "metrics" and ep["interval"] == "30s"
        assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in svc(scaled, c)["spec"]["ports"]
        env = {e["name"]: e.get("value") for e in container(dep(scaled, c))["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert env["OTEL_SERVICE_NAME"] == f"ouroboros-{c}"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
        assert "$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"] and "POD_NAME" in env

    # TLS: off by default (no TLS variables, probes on the serving port). In the TLS example
    # every component serves TLS from its Secret, mounted read-only and readable by the
    # pod's group only, answers plaintext health on port 8086 where its probes go; the
    # services require client certificates (mutual TLS) that the orchestrator presents,
    # and their NetworkPolicies let probes reach the health port.
    for c in components:
        env = {e["name"] for e in container(dep(default, c))["env"]}
        assert not [e for e in env if "TLS" in e or e == "OURO_HEALTH_LISTEN"], c
        ct = container(dep(tls, c))
        env = {e["name"]: e.get("value") for e in ct["env"]}
        assert env["OURO_TLS_CERT"] == "/etc/ouro/tls/tls.crt", c
        assert env["OURO_TLS_KEY"] == "/etc/ouro/tls/tls.key", c
        assert env["OURO_HEALTH_LISTEN"] == "0.0.0.0:8086", c
        assert {"name": "health", "containerPort": 8086, "protocol": "TCP"} in ct["ports"]
        for p in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ct[p]["grpc"]["port"] == 8086, (c, p)
        assert {"name": "tls", "mountPath": "/etc/ouro/tls", "readOnly": True} in ct["volumeMounts"]
        spec = dep(tls, c)["spec"]["template"]["spec"]
        secret = volume(spec, "tls")["secret"]
        want = "ouroboros-public-tls" if c == "orchestrator" else "ouroboros-internal-tls"
        assert secret == {"secretName": want, "defaultMode": 0o440}, (c, secret)
        if c == "orchestrator":
            assert "OURO_TLS_CLIENT_CA" not in env
            assert env["OURO_BACKEND_TLS_CA"] == "/etc/ouro/backend-tls/ca.crt"
            assert env["OURO_BACKEND_TLS_CERT"] == "/etc/ouro/backend-tls/tls.crt"
            assert env["OURO_BACKEND_TLS_KEY"] == "/etc/ouro/backend-tls/tls.key"
            assert volume(spec, "backend-tls")["secret"]["secretName"] == "ouroboros-orchestrator-tls"
        else:
            assert env["OURO_TLS_CLIENT_CA"] == "/etc/ouro/tls/ca.crt", c
            assert not [e for e in env if e.startswith("OURO_BACKEND_TLS")], c
            rules = tls[("NetworkPolicy", f"demo-ouroboros-{c}")]["spec"]["ingress"]
            assert {"ports": [{"port": 8086, "protocol": "TCP"}]} in rules, c
    # The chart's variable names are flags the binaries know (their --help lists them).
    tls_flags = {"OURO_TLS_CERT": "--tls-cert", "OURO_TLS_KEY": "--tls-key",
                 "OURO_TLS_CLIENT_CA": "--tls-client-ca", "OURO_HEALTH_LISTEN": "--health-listen",
                 "OURO_BACKEND_TLS_CA": "--backend-tls-ca", "OURO_BACKEND_TLS_CERT": "--backend-tls-cert",
                 "OURO_BACKEND_TLS_KEY": "--backend-tls-key"}

    # Every flag the chart passes is one the binary knows.
    binary = {"orchestrator": "ouro", "draft": "draft-service", "target": "target-service"}
    for c in components:
        ct = container(dep(scaled, c))
        exe = os.path.join(bins, binary[c])
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} is missing: build the workspace first (cargo build --release)")
        args = ct["args"]
        sub = [args[0]] if not args[0].startswith("-") else []
        helptext = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, check=True).stdout
        for a in args:
            if a.startswith("--"):
                assert f"{a} " in helptext or f"{a}\n" in helptext or f"{a}=" in helptext, f"{binary[c]}: {a}"
        for e in container(dep(tls, c))["env"]:
            if e["name"] in tls_flags:
                assert f"[env: {e['name']}=" in helptext, f"{binary[c]}: {e['name']}"
        assert ct["command"] == [f"/app/bin/{binary[c]}"]
    print("chart assertions passed")


if __name__ == "__main__":
    main()
