#!/usr/bin/env python3
"""Checks behind deploy/validate.sh (run that: it installs the tools and renders kustomize).

1. Every object that `kubectl kustomize` rendered for deploy/k8s/{base,overlays/{cpu,gpu,canary}},
   and the Prometheus-adapter ConfigMap, validates against the Kubernetes JSON schemas of
   kubernetes-validate in strict mode (unknown fields are errors). A kind without a schema (a
   CRD) is an error here, not the CLI's warning: the manifests use built-in kinds only.
2. Cross-checks the schemas cannot see: Services, PDBs and HPAs select or target something that
   exists; mounted ConfigMaps exist; the TOML in the ConfigMap parses and its addresses match the
   Services (gateway -> retriever, headless ranker, redis) and the probe ports; every container
   has requests/limits, probes and a non-root security context; the gpu overlay really asks for a
   GPU and sets LLAMAREC_RANKER__DEVICE; the canary rankers ([gateway.canary.rankers] dns, with
   the gateway container's LLAMAREC_GATEWAY__* overrides) are pods of their own, checked as the
   stable ranker's (ports, probes, Secrets, NetworkPolicy); the gateway's admin_tokens_file is a
   Secret of its own.
3. deploy/compose.yaml parses as a Compose Specification file (compose-spec, strict) and every
   service, volume, bind source, build context and Dockerfile it names exists; the config hosts
   it relies on are its services.
4. The Dockerfiles: the shared builder block is byte-identical in the four CPU images, and every
   COPY source exists and is not excluded by .dockerignore.
"""

import argparse
import fnmatch
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


def load_all(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kn(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- 1. schemas ---------------------------------------------------------------------------------

def validate_schemas(objs: list[dict], source: str, version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(f"{source}: {kn(obj)} does not validate against Kubernetes {version}: {path}: {e.message}")
        except SchemaNotFoundError:
            fail(f"{source}: {kn(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} (a CRD?)")


# --- 2. cross-checks ----------------------------------------------------------------------------

def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def redis_fsyncs_every_write(args: list, where: str) -> None:
    """The README promises an acknowledged append is durable: Redis must fsync each write."""
    # Words, whether given as an argument list or as one `sh -c` script.
    args = " ".join(str(a) for a in args or []).split()
    for flag, want in (("--appendonly", "yes"), ("--appendfsync", "always")):
        if flag not in args or args.index(flag) + 1 >= len(args) or args[args.index(flag) + 1] != want:
            fail(f"{where}: redis-server needs {flag} {want} (acknowledged appends must be on disk)")


def cross_check(objs: list[dict], source: str) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    deployments = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    configmaps = by_kind.get("ConfigMap", {})
    where = lambda o: f"{source}: {kn(o)}"  # noqa: E731

    for d in deployments.values():
        if not selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]):
            fail(f"{where(d)}: selector does not match its own pod labels")
        spec = pod_spec(d)
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            fail(f"{where(d)}: pod securityContext.runAsNonRoot is not true")
        for vol in spec.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in configmaps:
                fail(f"{where(d)}: volume {vol['name']} mounts missing ConfigMap {vol['configMap']['name']}")
        volume_names = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c.get("resources", {})
            if not (res.get("requests") and res.get("limits")):
                fail(f"{where(d)}: container {c['name']} lacks resource requests and limits")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                fail(f"{where(d)}: container {c['name']} allows privilege escalation")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volume_names:
                    fail(f"{where(d)}: container {c['name']} mounts undefined volume {m['name']}")
        for c in spec["containers"]:
            if not (c.get("readinessProbe") and c.get("livenessProbe")):
                fail(f"{where(d)}: container {c['name']} lacks readiness or liveness probe")

    for s in services.values():
        sel = s["spec"].get("selector", {})
        targets = [d for d in deployments.values() if selects(sel, d["spec"]["template"]["metadata"]["labels"])]
        if not targets:
            fail(f"{where(s)}: selector {sel} matches no Deployment")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for d in targets:
                ports = {cp.get("name"): cp["containerPort"] for c in pod_spec(d)["containers"] for cp in c.get("ports", [])}
                if (isinstance(tp, str) and tp not in ports) or (isinstance(tp, int) and tp not in ports.values()):
                    fail(f"{where(s)}: targetPort {tp} is not a port of {kn(d)}")
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(selects(sel, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values()):
            fail(f"{where(pdb)}: selector matches no Deployment")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            fail(f"{where(hpa)}: scaleTargetRef {ref} does not exist")

    # The layered TOML in the ConfigMap against the objects that serve those addresses.
    cms = [c for n, c in configmaps.items() if n.startswith("llamarec-config")]
    if len(cms) != 1:
        fail(f"{source}: expected one llamarec-config ConfigMap, found {len(cms)}")
        return
    try:
        cfg = tomllib.loads(cms[0]["data"]["llamarec.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        fail(f"{source}: llamarec.toml in the ConfigMap does not parse: {e}")
        return
    # The gateway reads its sections with its container's LLAMAREC_GATEWAY__* overrides on top
    # (the canary overlay sets [gateway.canary] and admin_tokens_file that way).
    if "gateway" in deployments:
        cfg = with_env_overrides(cfg, pod_spec(deployments["gateway"])["containers"][0], "gateway")
    gw = cfg["gateway"]

    def service_port(name: str, port: int, what: str) -> dict | None:
        svc = services.get(name)
        if svc is None:
            fail(f"{source}: {what} names host {name!r}, which is no Service")
            return None
        if port not in [p["port"] for p in svc["spec"]["ports"]]:
            fail(f"{source}: {what} port {port} is not a port of Service {name}")
        return svc

    service_port(*host_port(gw["retriever"]), "[gateway] retriever")
    dns = gw.get("rankers", {}).get("dns")
    if not dns:
        fail(f"{source}: [gateway.rankers] dns is not set")
    else:
        svc = service_port(*host_port(dns), "[gateway.rankers] dns")
        if svc is not None and svc["spec"].get("clusterIP") != "None":
            fail(f"{source}: Service {svc['metadata']['name']} must be headless (clusterIP: None) for per-request balancing")
    if gw.get("rankers", {}).get("addresses"):
        fail(f"{source}: [gateway.rankers] addresses must be empty when dns is used (the static list is kept too)")
    # The canary arm's rankers (README "Canary split"): a headless Service of ranker pods of
    # their own, checked below as the stable ranker is (ports, probes, Secrets, NetworkPolicy).
    canary = lookup(gw, ("canary", "rankers")) or {}
    if canary.get("dns"):
        svc = service_port(*host_port(canary["dns"]), "[gateway.canary.rankers] dns")
        if svc is not None and svc["spec"].get("clusterIP") != "None":
            fail(f"{source}: Service {svc['metadata']['name']} must be headless (clusterIP: None) for per-request balancing")
        if canary.get("addresses"):
            fail(f"{source}: [gateway.canary.rankers] addresses must be empty when dns is used")
        for d in canary_deployments(cfg, deployments, services):
            if d["metadata"]["name"] == "ranker":
                fail(f"{source}: [gateway.canary.rankers] dns reaches the stable ranker pods: the canary needs pods of its own (app.kubernetes.io/name: ranker-canary)")
            for c in pod_spec(d)["containers"]:
                if not runs_model_service(c.get("image")):
                    fail(f"{source}: {kn(d)} container {c['name']} ({c.get('image')}) is the canary's ranker but runs no ranker image")
    store = gw.get("store", {})
    if store.get("kind") != "redis":
        fail(f"{source}: [gateway.store] kind must be redis (several gateway replicas share histories)")
    else:
        m = re.match(r"redis://([^:/]+):(\d+)", store["url"])
        if not m:
            fail(f"{source}: [gateway.store] url {store['url']!r} is not redis://HOST:PORT/...")
        else:
            service_port(m.group(1), int(m.group(2)), "[gateway.store] url")
    if "redis" in deployments:
        c = pod_spec(deployments["redis"])["containers"][0]
        redis_fsyncs_every_write(c.get("command", []) + c.get("args", []), f"{source}: Deployment redis")
    canaries = [(d["metadata"]["name"], "ranker") for d in canary_deployments(cfg, deployments, services) if d["metadata"]["name"] != "ranker"]
    for name, section in [("gateway", "gateway"), ("retriever", "retriever"), ("ranker", "ranker")] + canaries:
        d = deployments.get(name)
        if d is None:
            fail(f"{source}: no Deployment {name}")
            continue
        _, port = host_port(cfg[section]["listen"])
        _, mport = host_port(cfg[section]["metrics_listen"])
        c = pod_spec(d)["containers"][0]
        # The kubelet's gRPC probes cannot do TLS: with TLS on the listener they must use the
        # plaintext health-only port.
        key = "listen"
        if cfg[section].get("tls"):
            key = "health_listen"
            if "health_listen" not in cfg[section]:
                fail(f"{source}: [{section}] has TLS on but no health_listen: the gRPC probes would fail")
                continue
            _, port = host_port(cfg[section]["health_listen"])
        if port not in [p["containerPort"] for p in c.get("ports", [])]:
            fail(f"{source}: {kn(d)} does not declare [{section}] {key} port {port}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if c.get(probe, {}).get("grpc", {}).get("port") != port:
                fail(f"{source}: {kn(d)} {probe} is not a gRPC probe on [{section}] {key} port {port}")
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/port") != str(mport):
            fail(f"{source}: {kn(d)} prometheus.io/port is not [{section}] metrics port {mport}")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if env.get("LLAMAREC_CONFIG") != "/etc/llamarec/llamarec.toml":
            fail(f"{source}: {kn(d)} does not point LLAMAREC_CONFIG at the mounted ConfigMap")

    check_k8s_security(cfg, by_kind, source)

    ranker = deployments.get("ranker")
    if ranker is not None and source.endswith("gpu"):
        c = pod_spec(ranker)["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if not str(c["resources"].get("limits", {}).get("nvidia.com/gpu", "")).isdigit():
            fail(f"{source}: gpu ranker has no nvidia.com/gpu limit")
        if not env.get("LLAMAREC_RANKER__DEVICE", "").startswith("cuda:"):
            fail(f"{source}: gpu ranker does not set LLAMAREC_RANKER__DEVICE=cuda:N")
        if "ranker-cuda" not in c["image"]:
            fail(f"{source}: gpu ranker does not run the CUDA image ({c['image']})")


def with_env_overrides(cfg: dict, container: dict, section: str) -> dict:
    """cfg with the container's literal LLAMAREC_<SECTION>__<KEY>[__<KEY>...] values on top (as
    the service layers them), for the one section given; values parse as TOML, else a string."""
    import copy

    cfg = copy.deepcopy(cfg)
    prefix = f"LLAMAREC_{section.upper()}__"
    for e in container.get("env", []):
        if not e["name"].startswith(prefix) or e.get("value") is None:
            continue
        try:
            value = tomllib.loads(f"v = {e['value']}")["v"]
        except tomllib.TOMLDecodeError:
            value = e["value"]
        node = cfg.setdefault(section, {})
        keys = [k.lower() for k in e["name"][len(prefix):].split("__")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


def canary_deployments(cfg: dict, deployments: dict, services: dict) -> list[dict]:
    """The Deployments behind [gateway.canary.rankers] dns (none when it is not set)."""
    dns = lookup(cfg, ("gateway", "canary", "rankers", "dns"))
    svc = services.get(host_port(str(dns))[0]) if dns else None
    if svc is None:
        return []
    sel = svc["spec"].get("selector", {})
    return [d for d in deployments.values() if selects(sel, d["spec"]["template"]["metadata"]["labels"])]


# --- 2b. secure by default (issue 18) -----------------------------------------------------------

# What each service's config must read from a mounted secret, as (TOML path, what).
SECRET_FILES = {
    "gateway": [
        (("gateway", "backend_token_file"), "the backend token it sends"),
        (("gateway", "tls", "cert"), "its TLS certificate"),
        (("gateway", "tls", "key"), "its TLS key"),
        (("gateway", "auth", "tokens_file"), "the callers' tokens"),
        (("gateway", "backend_tls", "ca"), "the backends' CA"),
        (("gateway", "store", "password_file"), "the Redis password"),
    ],
    "retriever": [
        (("retriever", "auth_token_file"), "the backend token it requires"),
        (("retriever", "admin_tokens_file"), "the operators' Reload tokens"),
        (("retriever", "tls", "cert"), "its TLS certificate"),
        (("retriever", "tls", "key"), "its TLS key"),
    ],
    "ranker": [
        (("ranker", "auth_token_file"), "the backend token it requires"),
        (("ranker", "admin_tokens_file"), "the operators' Reload tokens"),
        (("ranker", "tls", "cert"), "its TLS certificate"),
        (("ranker", "tls", "key"), "its TLS key"),
    ],
}
# The model services: each has a Reload RPC (`llamarec reload retriever|ranker`) that swaps the
# model it serves, allowed only with a token from its [<service>] admin_tokens_file. Those are the
# operators' tokens: only a container that runs a model service may hold them, never the gateway
# (a compromise of the service callers reach must not swap models), Redis or an init container.
MODEL_SERVICES = ("retriever", "ranker")
# Images that run a model service: the last path component, without tag or digest (a registry
# prefix set with `kustomize edit set image` keeps it).
MODEL_IMAGES = {"retriever", "ranker", "ranker-cuda"}


def runs_model_service(image: object) -> bool:
    return re.split(r"[:@]", str(image or "").rsplit("/", 1)[-1])[0] in MODEL_IMAGES


# Secrets written into the config itself (a ConfigMap, an image layer) instead of a file.
INLINE_SECRETS = [("gateway", "backend_token"), ("gateway", "auth", "tokens"), ("retriever", "auth_token"), ("ranker", "auth_token")]


def lookup(cfg: dict, path: tuple) -> object:
    for part in path:
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def check_config_security(cfg: dict, where: str) -> list[tuple[str, str, str]]:
    """The properties of a shipped config alone; returns (service, file path, what) to mount."""
    for path in INLINE_SECRETS:
        if lookup(cfg, path):
            fail(f"{where}: [{'.'.join(path[:-1])}] {path[-1]} is set inline: a secret in the config; use the *_file key and a Secret")
    gw = cfg.get("gateway", {})
    url = gw.get("store", {}).get("url", "")
    if re.match(r"rediss?://[^/@]*:[^/@]*@", url):
        fail(f"{where}: [gateway.store] url carries a password; use password_file")
    for section in ("retriever", "ranker"):
        listen = cfg.get(section, {}).get("listen", "127.0.0.1:0")
        if not host_port(listen)[0] in ("127.0.0.1", "localhost", "[::1]") and not cfg[section].get("tls"):
            fail(f"{where}: [{section}] listens on {listen} without [{section}.tls]: the backend token would cross the network in clear")
    backend_files = {str(f) for f in [lookup(cfg, ("gateway", "backend_token_file"))] + [lookup(cfg, (s, "auth_token_file")) for s in MODEL_SERVICES] if f}
    for service in MODEL_SERVICES:
        admin = lookup(cfg, (service, "admin_tokens_file"))
        if admin and str(admin) in backend_files:
            fail(f"{where}: [{service}] admin_tokens_file is the backend token's file: whoever holds the gateway's token could swap models")
    needed = []
    for service, items in SECRET_FILES.items():
        if service not in cfg:
            continue
        for path, what in items:
            if path == ("gateway", "store", "password_file") and gw.get("store", {}).get("kind") != "redis":
                continue
            value = lookup(cfg, path)
            if not value:
                fail(f"{where}: [{'.'.join(path[:-1])}] {path[-1]} is not set ({what}): not secure by default")
            else:
                needed.append((service, str(value), what))
    return needed


def secret_files(spec: dict, container: dict) -> dict[str, str]:
    """File path -> Secret name for every Secret file the container mounts."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for m in container.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        sources = []
        if "secret" in vol:
            sources.append(vol["secret"] | {"name": vol["secret"].get("secretName")})
        for src in vol.get("projected", {}).get("sources", []):
            if "secret" in src:
                sources.append(src["secret"])
        for sec in sources:
            for item in sec.get("items", []):
                files[f"{m['mountPath'].rstrip('/')}/{item['path']}"] = sec["name"]
    return files


def secrets_held(spec: dict, container: dict) -> set[str]:
    """Every Secret the container can read: mounted (whole or some keys, plain or projected) or
    in its environment."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    held = set()
    for m in container.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        if "secret" in vol:
            held.add(vol["secret"].get("secretName"))
        held.update(src["secret"].get("name") for src in vol.get("projected", {}).get("sources", []) if "secret" in src)
    held.update(e["valueFrom"]["secretKeyRef"].get("name") for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {}))
    held.update(e["secretRef"].get("name") for e in container.get("envFrom", []) if "secretRef" in e)
    return held


def peers_select_only(rule: dict, allowed: list[dict], deployments: dict) -> bool:
    """Every peer of an ingress rule is a same-namespace podSelector matching only `allowed`."""
    peers = rule.get("from")
    if not peers:
        return False  # no `from`: every source
    for peer in peers:
        if set(peer) != {"podSelector"}:
            return False  # namespaceSelector / ipBlock reach beyond the namespace's pods
        labels = peer["podSelector"].get("matchLabels", {})
        if not labels or peer["podSelector"].get("matchExpressions"):
            return False
        if labels not in allowed:
            return False
    return True


def check_k8s_security(cfg: dict, by_kind: dict, source: str) -> None:
    deployments = by_kind.get("Deployment", {})
    canaries = [d for d in canary_deployments(cfg, deployments, by_kind.get("Service", {})) if d["metadata"]["name"] != "ranker"]
    for service, path, what in check_config_security(cfg, f"{source}: llamarec.toml"):
        # The canary rankers read [ranker] as the stable ones do: the same files from Secrets.
        for d in [deployments.get(service)] + (canaries if service == "ranker" else []):
            if d is None:
                continue
            files = secret_files(pod_spec(d), pod_spec(d)["containers"][0])
            if path not in files:
                fail(f"{source}: {kn(d)} does not mount {path} ({what}) from a Secret")
    # The Reload RPCs' admin tokens: the Secrets behind the model services' admin_tokens_file,
    # held by containers that run a model service only (a ranker-canary copy of the ranker may).
    # Compared by Secret, not by key: a Secret of which another pod mounts any key (say the
    # backend token's Secret, were the admin tokens a key of it) is not the admin tokens' own.
    admin_secrets: dict[str, str] = {}
    for service in MODEL_SERVICES:
        admin, d = lookup(cfg, (service, "admin_tokens_file")), deployments.get(service)
        secret = secret_files(pod_spec(d), pod_spec(d)["containers"][0]).get(str(admin)) if admin and d else None
        if secret:
            admin_secrets.setdefault(secret, f"[{service}] admin_tokens_file")
    for d in deployments.values():
        spec = pod_spec(d)
        for c in spec.get("initContainers", []) + spec["containers"]:
            for secret in sorted(secrets_held(spec, c) & admin_secrets.keys()):
                if not runs_model_service(c.get("image")):
                    fail(f"{source}: {kn(d)} container {c['name']} ({c.get('image')}) can read the Reload admin tokens (Secret {secret}, {admin_secrets[secret]}): only the model services (retriever, ranker) may")
    # The gateway's own admin tokens (GetSplit/SetSplit, `llamarec split`): from a Secret of their
    # own, never the model services' Reload tokens nor the backend token's.
    gw_admin, gw = lookup(cfg, ("gateway", "admin_tokens_file")), deployments.get("gateway")
    if gw_admin and gw is not None:
        files = secret_files(pod_spec(gw), pod_spec(gw)["containers"][0])
        secret = files.get(str(gw_admin))
        if secret is None:
            fail(f"{source}: {kn(gw)} does not mount [gateway] admin_tokens_file {gw_admin} from a Secret")
        elif secret in admin_secrets:
            fail(f"{source}: [gateway] admin_tokens_file comes from Secret {secret}, the model services' Reload tokens ({admin_secrets[secret]}): give the gateway a Secret of its own")
        elif secret == files.get(str(lookup(cfg, ("gateway", "backend_token_file")))):
            fail(f"{source}: [gateway] admin_tokens_file comes from the backend token's Secret {secret}")
    # Redis: requirepass from a Secret, the same one the gateway reads.
    redis = deployments.get("redis")
    if redis is not None:
        c = pod_spec(redis)["containers"][0]
        script = " ".join(str(a) for a in c.get("command", []) + c.get("args", []))
        files = secret_files(pod_spec(redis), c)
        m = re.search(r"requirepass\s+\S*\$\(cat\s+([^)\s]+)\)", script)
        if not m:
            fail(f"{source}: Deployment redis does not set requirepass from a file")
        elif m.group(1) not in files:
            fail(f"{source}: Deployment redis reads its password from {m.group(1)}, which is no mounted Secret")
        else:
            gw = deployments.get("gateway")
            pw = lookup(cfg, ("gateway", "store", "password_file"))
            gw_files = secret_files(pod_spec(gw), pod_spec(gw)["containers"][0]) if gw else {}
            if gw_files.get(str(pw)) != files[m.group(1)]:
                fail(f"{source}: the gateway's password_file and Redis' requirepass come from different Secrets")
        probe = " ".join(str(a) for a in c.get("readinessProbe", {}).get("exec", {}).get("command", []))
        if probe and "PONG" not in probe:
            fail(f"{source}: Deployment redis readiness probe does not check for PONG (redis-cli exits 0 on NOAUTH)")
    # NetworkPolicy: only the gateway reaches retriever and ranker; only Redis users reach Redis.
    policies = list(by_kind.get("NetworkPolicy", {}).values())
    gateway = deployments.get("gateway")
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"] if gateway else {}
    redis_client = {"llamarec.io/redis-client": "true"}
    guarded = [("retriever", "retriever", "gateway"), ("ranker", "ranker", "gateway"), ("redis", None, "redis users")]
    guarded += [(d["metadata"]["name"], "ranker", "gateway") for d in canaries]
    for name, section, allowed in guarded:
        d = deployments.get(name)
        if d is None:
            continue
        labels = d["spec"]["template"]["metadata"]["labels"]
        port = host_port(cfg[section]["listen"])[1] if section else 6379
        selecting = [p for p in policies if not p["spec"]["podSelector"].get("matchExpressions") and all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items()) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not selecting:
            fail(f"{source}: no NetworkPolicy selects {kn(d)}: every pod in the cluster can reach it")
            continue
        ok_peers = [{"app.kubernetes.io/name": "gateway"}]
        if name == "redis":
            ok_peers.append(redis_client)
        opening = []
        for p in selecting:
            for rule in p["spec"].get("ingress", []):
                ports = [pp.get("port") for pp in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                opening.append(rule)
                if not peers_select_only(rule, ok_peers, deployments):
                    fail(f"{source}: NetworkPolicy {p['metadata']['name']} lets more than the {allowed} reach {kn(d)} port {port}")
        if not opening:
            fail(f"{source}: no NetworkPolicy rule lets the gateway reach {kn(d)} port {port}")
        elif not any(all(gateway_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items()) for r in opening for peer in r.get("from", []) if "podSelector" in peer):
            fail(f"{source}: the NetworkPolicies selecting {kn(d)} do not admit the gateway's pods")


# --- 3. compose ---------------------------------------------------------------------------------

def check_compose(path: pathlib.Path) -> None:
    from compose_spec import PyCompose  # strict Compose Specification parser (Rust compose_spec)

    try:
        PyCompose.from_yaml(path.read_text())
    except Exception as e:  # the binding raises a plain exception naming the key and line
        fail(f"{path}: not a valid Compose file: {e}")
    doc = yaml.safe_load(path.read_text())
    base = path.parent
    services = doc.get("services") or {}
    volumes = set((doc.get("volumes") or {}).keys())
    if not services:
        fail(f"{path}: no services")
    if "redis" in services:
        redis_fsyncs_every_write(services["redis"].get("command"), f"{path}: service redis")
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, (list, dict)) else []:
            if dep not in services:
                fail(f"{path}: service {name} depends on unknown service {dep}")
        for v in svc.get("volumes") or []:
            if isinstance(v, str):
                src = v.split(":")[0]
                if src.startswith((".", "/")):
                    if not (base / src).exists():
                        fail(f"{path}: service {name} binds missing {src}")
                elif src not in volumes:
                    fail(f"{path}: service {name} uses undeclared volume {src}")
            elif v.get("type") == "bind":
                if not (base / v["source"]).exists():
                    fail(f"{path}: service {name} binds missing {v['source']}")
            elif v.get("type") == "volume" and v.get("source") not in volumes:
                fail(f"{path}: service {name} uses undeclared volume {v.get('source')}")
        build = svc.get("build")
        if build:
            ctx = base / build.get("context", ".")
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                fail(f"{path}: service {name} builds from missing {ctx / build.get('dockerfile', 'Dockerfile')}")
        if not (svc.get("image") or build):
            fail(f"{path}: service {name} has neither image nor build")
    check_compose_security(doc, services, base, path)
    # The mounted config's hosts must be compose services (Docker's DNS resolves service names).
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            if isinstance(v, dict) and v.get("target") == "/etc/llamarec/llamarec.toml":
                cfg = tomllib.loads((base / v["source"]).read_text())
                gw = cfg["gateway"]
                hosts = {host_port(gw["retriever"])[0], host_port(gw["rankers"]["dns"])[0]}
                if gw["store"]["kind"] == "redis":
                    hosts.add(re.match(r"redis://([^:/]+)", gw["store"]["url"]).group(1))
                for h in hosts - set(services):
                    fail(f"{path}: config {v['source']} names host {h!r}, which is no compose service")
                break


def check_compose_security(doc: dict, services: dict, base: pathlib.Path, path: pathlib.Path) -> None:
    # Published ports on loopback only: Docker's published ports bypass the host firewall.
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            if isinstance(p, dict):
                ip = p.get("host_ip")
            else:
                parts = str(p).rsplit(":", 2)
                ip = parts[0] if len(parts) == 3 else None
            if ip not in ("127.0.0.1", "::1", "[::1]"):
                fail(f"{path}: service {name} publishes {p!r} on every interface (0.0.0.0); bind it to 127.0.0.1")
    top = doc.get("secrets") or {}
    for sname, sdef in top.items():
        if not sdef.get("file"):
            fail(f"{path}: secret {sname} has no file")
    mounted: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        for sec in svc.get("secrets") or []:
            src, target = (sec, f"/run/secrets/{sec}") if isinstance(sec, str) else (sec["source"], sec.get("target", f"/run/secrets/{sec['source']}"))
            if src not in top:
                fail(f"{path}: service {name} uses undeclared secret {src}")
            mounted.setdefault(name, {})[target] = src
    cfg_path = next((v["source"] for svc in services.values() for v in svc.get("volumes") or [] if isinstance(v, dict) and v.get("target") == "/etc/llamarec/llamarec.toml"), None)
    if cfg_path is None:
        fail(f"{path}: no service mounts a llamarec.toml")
        return
    cfg = tomllib.loads((base / cfg_path).read_text())
    for service, file, what in check_config_security(cfg, f"{path}: {cfg_path}"):
        if service in services and file not in mounted.get(service, {}):
            fail(f"{path}: service {service} does not mount {file} ({what}) as a secret")
    # As in Kubernetes: the secrets behind the model services' admin_tokens_file, in services that
    # run a model service only.
    admin_secrets: dict[str, str] = {}
    for service in MODEL_SERVICES:
        admin = lookup(cfg, (service, "admin_tokens_file"))
        src = mounted.get(service, {}).get(str(admin)) if admin else None
        if src:
            admin_secrets.setdefault(src, f"[{service}] admin_tokens_file")
    for name, files in mounted.items():
        image = services[name].get("image") or pathlib.Path((services[name].get("build") or {}).get("dockerfile", "")).name.removesuffix(".Dockerfile")
        for src in sorted(set(files.values()) & admin_secrets.keys()):
            if not runs_model_service(image):
                fail(f"{path}: service {name} ({image}) mounts the Reload admin tokens ({src}, {admin_secrets[src]}): only the model services (retriever, ranker) may")
    if "redis" in services:
        script = " ".join(str(a) for a in (services["redis"].get("command") or []))
        m = re.search(r"requirepass\s+\S*\$\$?\(cat\s+([^)\s]+)\)", script)
        pw = lookup(cfg, ("gateway", "store", "password_file"))
        if not m:
            fail(f"{path}: service redis does not set requirepass from a secret file")
        elif mounted.get("redis", {}).get(m.group(1)) is None or mounted["redis"][m.group(1)] != mounted.get("gateway", {}).get(str(pw)):
            fail(f"{path}: redis' requirepass file and the gateway's password_file are not the same secret")
        test = " ".join(str(a) for a in (services["redis"].get("healthcheck") or {}).get("test", []))
        if "PONG" not in test:
            fail(f"{path}: service redis healthcheck does not check for PONG (redis-cli exits 0 on NOAUTH)")
    # HEALTHCHECK (`llamarec health`) of a service whose listener has TLS on needs the CA the
    # images name in LLAMAREC_TLS_CA.
    for service in ("gateway", "retriever", "ranker"):
        if service in services and lookup(cfg, (service, "tls")) and "/run/secrets/llamarec/ca.crt" not in mounted.get(service, {}):
            fail(f"{path}: service {service} serves TLS but does not mount /run/secrets/llamarec/ca.crt for its HEALTHCHECK")


# --- 4. Dockerfiles -----------------------------------------------------------------------------

BLOCK = re.compile(r"^# ---- shared builder.*?^# ---- end of shared builder ----$", re.S | re.M)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip().rstrip("/") for l in lines if l.strip() and not l.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    for pat in patterns:
        pat = pat[3:] if pat.startswith("**/") else pat
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:i]), pat) or fnmatch.fnmatch(parts[i - 1], pat):
                return True
    return False


def check_dockerfiles() -> None:
    d = ROOT / "deploy" / "docker"
    blocks = {}
    for name in ("gateway", "retriever", "ranker", "tools"):
        text = (d / f"{name}.Dockerfile").read_text()
        m = BLOCK.search(text)
        if not m:
            fail(f"deploy/docker/{name}.Dockerfile: no shared builder block")
        else:
            blocks[name] = m.group(0)
    if len(set(blocks.values())) > 1:
        fail(f"deploy/docker: the shared builder blocks differ between {sorted(blocks)}: keep them identical")
    patterns = dockerignore_patterns()
    for f in sorted(d.glob("*.Dockerfile")):
        text = re.sub(r"\\\n", " ", f.read_text())
        if "HEALTHCHECK" not in text and f.name != "tools.Dockerfile":
            fail(f"{f.relative_to(ROOT)}: no HEALTHCHECK")
        if f.name != "tools.Dockerfile" and not re.search(r"LLAMAREC_TLS_CA=\S+", text):
            fail(f"{f.relative_to(ROOT)}: no LLAMAREC_TLS_CA: its HEALTHCHECK cannot reach a TLS listener")
        if not re.search(r"^USER \d+", text, re.M):
            fail(f"{f.relative_to(ROOT)}: does not switch to a numeric non-root USER")
        for line in text.splitlines():
            m = re.match(r"^COPY\s+(.*)$", line.strip())
            if not m or "--from=" in m.group(1):
                continue
            srcs = m.group(1).split()[:-1]
            for src in srcs:
                if src == ".":
                    continue
                if not (ROOT / src).exists():
                    fail(f"{f.relative_to(ROOT)}: COPY source {src} does not exist")
                elif ignored(src, patterns):
                    fail(f"{f.relative_to(ROOT)}: COPY source {src} is excluded by .dockerignore")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("--rendered", required=True, type=pathlib.Path, help="folder of rendered overlays (*.yaml)")
    args = ap.parse_args()

    rendered = sorted(args.rendered.glob("*.yaml"))
    if not rendered:
        fail(f"nothing rendered in {args.rendered}")
    for path in rendered:
        objs = load_all(path)
        kinds = sorted({o["kind"] for o in objs})
        validate_schemas(objs, path.stem, args.k8s_version)
        cross_check(objs, path.stem)
        print(f"deploy/validate: {path.stem}: {len(objs)} objects ({', '.join(kinds)}) checked against Kubernetes {args.k8s_version}")
    # Not part of any overlay: the adapter's own config, for the custom metric the ranker HPA uses.
    for path in sorted((ROOT / "deploy/k8s/prometheus-adapter").glob("adapter-*.yaml")):
        objs = load_all(path)
        validate_schemas(objs, str(path.relative_to(ROOT)), args.k8s_version)
        for o in objs:
            rules = yaml.safe_load(o["data"]["config.yaml"])["rules"]
            if not any(r.get("name", {}).get("as") == "llamarec_ranker_queue_depth" for r in rules):
                fail(f"{path}: no rule exposing llamarec_ranker_queue_depth")
        print(f"deploy/validate: {path.relative_to(ROOT)}: {len(objs)} objects checked")
    values = yaml.safe_load((ROOT / "deploy/k8s/prometheus-adapter/values-snippet.yaml").read_text())
    if not values["rules"]["custom"]:
        fail("deploy/k8s/prometheus-adapter/values-snippet.yaml: no custom rules")

    check_compose(ROOT / "deploy" / "compose.yaml")
    print("deploy/validate: deploy/compose.yaml valid against the Compose Specification; references checked")
    check_dockerfiles()
    print("deploy/validate: deploy/docker/*.Dockerfile checked (shared builder block, COPY sources, HEALTHCHECK TLS)")
    # The image's own config (a bare `docker run`) is secure by default too.
    check_config_security(tomllib.loads((ROOT / "deploy/docker/llamarec.toml").read_text()), "deploy/docker/llamarec.toml")
    print("deploy/validate: secure by default: NetworkPolicies, backend tokens and TLS from Secrets, Reload admin tokens in the model services only, Redis password, loopback-only compose ports")

    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    if errors:
        print(f"deploy/validate: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
