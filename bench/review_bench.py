#!/usr/bin/env python3
"""How fast the live review page of a large result opens in Chromium, against the static
index.html the step writes (the baseline), both in one process and one browser.

A synthetic library (bench/synthetic.py: real-photo-like distances) of --faces faces with
small real photo files and stored thumbnails is clustered; then --repeat times, in a fresh
headless Chromium each: the static page from disk and the live page from `review`. Per
page: first contentful paint, DOMContentLoaded, load, and interactive (the page's script
has wired its controls), in ms from navigation start; plus the server's time to build the
page. Prints medians and the live/static ratios; the last line is one JSON object.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import sort_faces  # noqa: E402
import synthetic  # noqa: E402
from cluster_scale import run_cluster, write_cache  # noqa: E402

TIMING = """
const nav = performance.getEntriesByType('navigation')[0];
const fcp = performance.getEntriesByName('first-contentful-paint')[0];
return {fcp: fcp ? fcp.startTime : null, dcl: nav.domContentLoadedEventEnd,
        load: nav.loadEventEnd, ready: Number(document.body.dataset.sfReady || 0) || null,
        faces: document.querySelectorAll('img[data-face]').length};
"""


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def measure(driver, url):
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    WebDriverWait(driver, 600).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    time.sleep(0.2)                              # the load event's end is recorded
    return driver.execute_script(TIMING)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=50_000, help="synthetic faces")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each page")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="2,000 faces, one run (checks the bench works; figures mean nothing)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.faces, args.repeat = 2000, 1
    tmp = tempfile.mkdtemp(prefix="review_bench-")
    try:
        emb, _, groups = synthetic.make(args.faces, args.seed)
        cache, out = os.path.join(tmp, "c.npz"), os.path.join(tmp, "out")
        write_cache(cache, emb, groups, photos_dir=os.path.join(tmp, "photos"))
        run_cluster(cache, out, [], os.path.join(tmp, "logs"))
        server = sort_faces.ReviewServer(out)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        build = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            server.page()
            build.append(1000 * (time.perf_counter() - t))
        runs = {"static": [], "live": []}
        for _ in range(args.repeat):
            driver = browser()
            try:
                runs["static"].append(measure(driver, "file://" + os.path.join(out,
                                                                               "index.html")))
                runs["live"].append(measure(driver, server.url))
            finally:
                driver.quit()
        server.httpd.shutdown()
        med = {kind: {k: round(statistics.median([r[k] for r in rs if r[k] is not None]), 1)
                      if any(r[k] is not None for r in rs) else None
                      for k in ("fcp", "dcl", "load", "ready", "faces")}
               for kind, rs in runs.items()}
        ratio = {k: round(med["live"][k] / med["static"][k], 2)
                 for k in ("fcp", "dcl", "load") if med["static"][k] and med["live"][k]}
        result = {"faces": args.faces, "people": len(server.view()[0]) - 1,
                  "repeat": args.repeat, "server_page_ms": round(statistics.median(build), 1),
                  "median_ms": med, "live_over_static": ratio, "runs": runs}
        for kind in ("static", "live"):
            m = med[kind]
            print(f"{kind:6s}: first paint {m['fcp']} ms, DOMContentLoaded {m['dcl']} ms, "
                  f"load {m['load']} ms, interactive {m['ready']} ms, {m['faces']} faces "
                  f"on the first page")
        print(f"server builds the live page in {result['server_page_ms']} ms; live/static "
              f"{ratio}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
