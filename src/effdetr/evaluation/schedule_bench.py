"""Replay the DAG's stages on N cores in the order Snakemake's priorities give, from the
expected stage times (the last run's recorded training times, a minute for other stages):
how long the whole DAG would take under one ordering against another, and the floors no
ordering beats (the work over the cores, the critical path). No job runs; only the plan."""
from __future__ import annotations

import heapq

from ..stages import Stage, critical_path, estimated_seconds, recorded_seconds, stage_children


def downstream_counts(stages: list[Stage]) -> dict[str, int]:
    """Stage name -> how many stages wait on it, transitively (the older priority)."""
    children = stage_children(stages)
    below: dict[str, set[str]] = {}

    def down(name: str) -> set[str]:
        if name not in below:
            found = set(children[name])
            for child in children[name]:
                found |= down(child)
            below[name] = found
        return below[name]
    return {st.name: len(down(st.name)) for st in stages}


def cores_used(st: Stage, cores: int) -> int:
    """A heavy stage without its own thread count takes every core (Snakemake runs it alone)."""
    if st.heavy and not st.threads:
        return cores
    return min(st.threads or 1, cores)


def replay(stages: list[Stage], seconds: dict[str, float], priority: dict[str, float], cores: int) -> float:
    """Makespan of greedy list scheduling: whenever cores free up, start the ready stages in
    descending priority that fit (as Snakemake's scheduler does with priorities)."""
    children = stage_children(stages)
    parents = {st.name: set() for st in stages}
    for name, kids in children.items():
        for kid in kids:
            parents[kid].add(name)
    by_name = {st.name: st for st in stages}
    ready = [n for n, ps in parents.items() if not ps]
    running: list[tuple[float, str]] = []
    done: set[str] = set()
    now, free = 0.0, cores
    while len(done) < len(stages):
        ready.sort(key=lambda n: (-priority[n], n))  # ties by name: the same replay every run
        for name in list(ready):
            need = cores_used(by_name[name], cores)
            if need <= free:
                free -= need
                heapq.heappush(running, (now + seconds[name], name))
                ready.remove(name)
        if not running:
            raise RuntimeError(f"replay: nothing can start on {cores} cores (ready: {ready})")
        now, name = heapq.heappop(running)
        free += cores_used(by_name[name], cores)
        done.add(name)
        ready += [k for k in children[name] if parents[k] <= done and k not in ready]
    return now


def run_schedule_benchmark(stages: list[Stage], cores: int) -> dict:
    seconds = estimated_seconds(stages)
    work = sum(seconds[st.name] * cores_used(st, cores) for st in stages)
    path_s, path = critical_path(stages, seconds)
    return {"cores": cores, "stages": len(stages),
            "recorded_trainings": sum(1 for st in stages if st.kind in ("train", "pretrain")
                                      and recorded_seconds(st) is not None),
            "work_core_s": work,
            "floor_work_s": work / cores, "floor_critical_path_s": path_s, "critical_path": path,
            "makespan_s": {"downstream_count": replay(stages, seconds, downstream_counts(stages), cores),
                           "expected_work": replay(stages, seconds, {st.name: st.priority for st in stages}, cores)}}


def format_schedule(r: dict) -> str:
    m = r["makespan_s"]
    return "\n".join([
        f"[bench schedule] {r['stages']} stages on {r['cores']} cores, {r['recorded_trainings']} trainings with a "
        f"recorded time; {r['work_core_s'] / 3600:.2f} core-hours of work",
        f"  priority = stages downstream (older):  {m['downstream_count'] / 60:7.1f} min",
        f"  priority = expected work to the end:   {m['expected_work'] / 60:7.1f} min",
        f"  floors: work / cores {r['floor_work_s'] / 60:.1f} min, critical path {r['floor_critical_path_s'] / 60:.1f} min "
        f"({' -> '.join(r['critical_path'])})"])
