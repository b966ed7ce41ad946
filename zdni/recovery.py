"""When the driver treats a stage's batches as lost: the pure rules, apart from any socket or process."""

from __future__ import annotations


class Recovery:
    """Decides when a stage has lost batches: the pure part of the driver's failure handling.

    The monitor's 'failed' is a suspicion (a starved worker can miss two beats); batches are
    replayed only on evidence that the worker process is gone: a local worker whose process
    exited (once the monitor has marked it failed, or after three intervals if it is silent),
    or a worker of another host that beats again with a new pid, i.e. was restarted by hand.
    """

    def __init__(self, restart: bool) -> None:
        self.restart = restart
        self.exited_at: dict[int, float] = {}
        self.pids: dict[int, str] = {}  # stage -> pid of its first known worker process
        self.replaced: dict[int, str] = {}  # stage -> pid of the process we replaced

    def failed(self, dead: dict[str, int], health: dict[int, str], pids: dict[int, str],
               now: float, interval: float) -> list[int]:
        out = []
        for name in dead:
            if name.startswith("stage "):
                self.exited_at.setdefault(int(name.split()[1]), now)
        for stage, since in list(self.exited_at.items()):
            if health.get(stage) == "failed" or now - since > 3 * interval:
                out.append(stage)
                del self.exited_at[stage]
                self.replaced[stage] = self.pids.pop(stage, "")  # we restart it: a new pid comes
        for stage, pid in pids.items():
            if stage in self.replaced:
                if pid != self.replaced[stage]:  # the replacement's first beat
                    self.pids[stage] = pid
                    del self.replaced[stage]
                continue
            known = self.pids.setdefault(stage, pid)
            if pid != known:
                self.pids[stage] = pid
                if stage not in out and not dead:  # restarted elsewhere, not by us
                    out.append(stage)
        return sorted(out)
