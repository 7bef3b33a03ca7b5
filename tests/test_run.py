"""python -m kat_timm.run SCRIPT.py ARGS: the script runs as __main__, with its arguments and the KAT models."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import argparse
    import sys

    import timm

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--num-classes", type=int)
    args = parser.parse_args()
    model = timm.create_model(args.model, num_classes=args.num_classes, img_size=32, depth=1)
    print("argv0", sys.argv[0].endswith("show_model.py"))
    print("params", sum(p.numel() for p in model.parameters()))
    print("classes", model.num_classes)
    if __name__ == "__main__":
        sys.exit(3)
    """
)


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kat_timm.run", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_runs_script_as_main_with_kat_registered(tmp_path):
    script = tmp_path / "show_model.py"
    script.write_text(SCRIPT)
    result = run(str(script), "--model", "kat_tiny_patch16_224", "--num-classes", "7")
    # The script's own exit code comes through (it exits 3 only when run as __main__).
    assert result.returncode == 3, result.stderr
    assert "argv0 True" in result.stdout and "classes 7" in result.stdout
    # Without kat_timm.run the same script can't find the model in timm's registry.
    plain = subprocess.run([sys.executable, str(script), "--model", "kat_tiny_patch16_224", "--num-classes", "7"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode != 3 and "Unknown model" in plain.stderr


def test_missing_script_and_usage(tmp_path):
    result = run(str(tmp_path / "nope.py"))
    assert result.returncode == 2 and "no such script" in result.stderr
    result = run()
    assert result.returncode == 2 and "usage:" in result.stderr
