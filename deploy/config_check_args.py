#!/usr/bin/env python3
"""What `llamarec config check` needs to know about a deployment beyond its TOML file.

    config_check_args.py k8s RENDERED.yaml TOML_OUT   # a `kubectl kustomize` output
    config_check_args.py compose compose.yaml         # a Compose file

Prints one argument per line for `llamarec config check` (`--gateway-replicas N`, then
`--env NAME=VALUE` for every literal LLAMAREC_<SECTION>__<KEY> a container sets), and for k8s
writes the `llamarec.toml` of the rendered ConfigMap to TOML_OUT, so the check reads exactly what
the pods mount. Variables from Secrets (`valueFrom`) have no value to check and are skipped, as
is LLAMAREC_CONFIG (the path of the file, not a key). The gateway replicas are the most that may
run at once: the gateway HPA's maxReplicas, else the Deployment's (or compose service's)
replicas, else 1. Two containers giving one variable different values is an error: each process
reads only its own sections, so a key set twice is a mistake. Needs PyYAML.
"""

import sys

import yaml


def add_env(found, name, value, where):
    if not name.startswith("LLAMAREC_") or "__" not in name or value is None:
        return
    value = str(value)
    if name in found and found[name][0] != value:
        sys.exit(f"{name} is {found[name][0]!r} in {found[name][1]} but {value!r} in {where}")
    found[name] = (value, where)


def k8s(rendered, toml_out):
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    configs = [d for d in docs if d.get("kind") == "ConfigMap" and "llamarec.toml" in (d.get("data") or {})]
    if len(configs) != 1:
        sys.exit(f"{rendered}: expected one ConfigMap with llamarec.toml, found {len(configs)}")
    with open(toml_out, "w") as f:
        f.write(configs[0]["data"]["llamarec.toml"])
    env = {}
    replicas = None
    for d in docs:
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == "gateway":
            replicas = d["spec"]["maxReplicas"]
        if kind not in ("Deployment", "StatefulSet"):
            continue
        if name == "gateway" and replicas is None:
            replicas = d["spec"].get("replicas")
        pod = d["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            for e in c.get("env", []):
                add_env(env, e["name"], e.get("value"), f"{kind}/{name} container {c['name']}")
    return replicas or 1, env


def compose(path):
    doc = yaml.safe_load(open(path))
    env = {}
    services = doc.get("services", {})
    for name, service in services.items():
        variables = service.get("environment") or {}
        if isinstance(variables, list):
            variables = dict(v.split("=", 1) if "=" in v else (v, None) for v in variables)
        for k, v in variables.items():
            add_env(env, k, v, f"service {name}")
    replicas = ((services.get("gateway") or {}).get("deploy") or {}).get("replicas", 1)
    return replicas, env


def main(argv):
    if len(argv) == 3 and argv[0] == "k8s":
        replicas, env = k8s(argv[1], argv[2])
    elif len(argv) == 2 and argv[0] == "compose":
        replicas, env = compose(argv[1])
    else:
        sys.exit(__doc__)
    print("--gateway-replicas")
    print(replicas)
    for name, (value, _) in sorted(env.items()):
        print("--env")
        print(f"{name}={value}")


if __name__ == "__main__":
    main(sys.argv[1:])
