"""CPU per process while N groups converge, for pdorch or DisaggregatedSet, and optionally a py-spy
profile of pdorch's controller (where its CPU goes).

    PYTHONPATH=$PWD python3 bench/controller/profile.py pdorch 200 [--spy OUT.txt]
    PYTHONPATH=$PWD python3 bench/controller/profile.py ds 200

A fresh dev cluster (8 nodes) named "profile"; prints the time until every group's 3 LWS are ready
and the CPU seconds each control-plane process used meanwhile (from /proc). `--spy` records a raw
py-spy profile of the controller (py-spy's `--function` mode: its line-number reader can crash on
a running 3.11 process). Used for the 200-group numbers under "Controller" in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
import uuid

from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace
from run import DS, SG, Tracker, disaggregatedset, proc_cpu, servinggroup

from pdorch.devcluster.cluster import DevCluster, default_state_dir, install_pdorch_crds
from pdorch.devcluster.controller_process import ControllerProc

PROCESSES = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok", "lws-manager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=("pdorch", "ds"))
    ap.add_argument("groups", type=int)
    ap.add_argument("--spy", help="write a raw py-spy profile of pdorch's controller here")
    args = ap.parse_args()
    cluster = DevCluster(default_state_dir("profile"), progress=lambda m: None)
    cluster.down()
    st = cluster.up(nodes=8)
    kube = st.client()
    ctl: ControllerProc | None = None
    try:
        kube.create(Namespace(metadata=ObjectMeta(name="bench")))
        if args.system == "pdorch":
            install_pdorch_crds(kube, "bench")
            ctl = ControllerProc(st.kubeconfig, "profile", f"profile-{uuid.uuid4().hex[:6]}")
            ctl.wait_ready()
        pids = {n: p.pid for n in PROCESSES if (p := st.process(n)) is not None}
        if ctl is not None:
            pids["pdorch controller"] = ctl.proc.pid
        cpu0 = {n: proc_cpu(p) for n, p in pids.items()}
        tracker = Tracker("pdorch.io/group" if args.system == "pdorch" else "disaggregatedset.x-k8s.io/name")
        stop = threading.Event()
        threading.Thread(target=tracker.run, args=(kube, "bench", stop), daemon=True).start()
        time.sleep(1.0)  # the watch is established before the first create
        spy = None
        if args.spy and ctl is not None:
            cmd = [
                "py-spy",
                "record",
                "-p",
                str(ctl.proc.pid),
                "-o",
                args.spy,
                "-f",
                "raw",
                "-r",
                "50",
                "--function",
            ]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        res, make = (SG, servinggroup) if args.system == "pdorch" else (DS, disaggregatedset)
        for i in range(args.groups):
            kube.create(res.from_dict(make(f"g{i:04d}")), namespace="bench")
        while len(tracker.ready) < args.groups and time.monotonic() - t0 < 900:
            time.sleep(0.5)
        print(
            f"{args.system}: {len(tracker.ready)}/{args.groups} groups ready after {time.monotonic() - t0:.1f} s"
        )
        for name, pid in pids.items():
            print(f"  {name:28s} {proc_cpu(pid) - cpu0[name]:7.1f} CPU s")
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        stop.set()
    finally:
        if ctl is not None:
            ctl.stop()
        cluster.down()


if __name__ == "__main__":
    main()
