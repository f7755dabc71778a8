"""`python -m interceptor.demo`: the demo's entry point (what `make demo` runs is the same:
interceptor/harness/demo.py). A front end like cli.py; it needs the harness extra."""
import runpy

if __name__ == "__main__":
    runpy.run_module("interceptor.harness.demo", run_name="__main__", alter_sys=True)
