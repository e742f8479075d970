"""lmctl command line (placeholder until the orchestrator lands)."""


def main() -> int:
    print("lmctl: the orchestrator verbs are not built yet")
    return 0
