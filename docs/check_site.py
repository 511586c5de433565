"""Open the built site in headless Chromium and check it as a reader would.

    mkdocs build --strict && python docs/check_site.py [--site site] [--shots DIR]

Serves `site/` on localhost, loads every page, and fails on any console error or
failed request; checks that the search finds `fixed_point` and that the API entry of
`fp.layers.DEQ` renders its arguments. With `--shots DIR` it saves a screenshot of a
few pages. Needs Debian's `chromium` (`/usr/bin/chromium`) and the `playwright`
package from the `docs` extra; without a browser it says so and exits 0, so CI can run
it everywhere (`--require-browser` makes a missing browser an error).
"""

import argparse
import functools
import http.server
import pathlib
import shutil
import sys
import threading

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = {
    "index": "",
    "deq": "api/layers/",
    "which_solver": "guides/which_solver/",
    "notebook": "notebooks/deq_digits/",
}


def _serve(site: pathlib.Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="site", type=pathlib.Path)
    parser.add_argument("--shots", default=None, type=pathlib.Path)
    parser.add_argument("--require-browser", action="store_true")
    options = parser.parse_args()

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_path = None
    if browser_path is None:
        print("check_site: no chromium or no playwright here; skipped")
        return 1 if options.require_browser else 0
    site = options.site.resolve()
    pages = sorted(p.relative_to(site) for p in site.rglob("index.html"))
    if not pages:
        print(f"check_site: no pages under {site}; run `mkdocs build --strict` first")
        return 1

    server = _serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        current = [""]
        page.on(
            "console",
            lambda m: m.type == "error" and problems.append(f"{current[0]}: console: {m.text}"),
        )
        page.on("pageerror", lambda e: problems.append(f"{current[0]}: page error: {e}"))
        page.on(
            "requestfailed",
            lambda r: problems.append(f"{current[0]}: request failed: {r.url}"),
        )
        for path in pages:
            url = base + str(path.parent).replace(".", "") + "/"
            url = url.replace("//", "/").replace(":/", "://")
            current[0] = str(path.parent)
            response = page.goto(url, wait_until="networkidle")
            if response is None or not response.ok:
                problems.append(f"{path.parent}: HTTP {response and response.status}")
        print(f"loaded {len(pages)} pages")

        # Search: type into Material's search box, wait for results from its worker.
        current[0] = "search"
        page.goto(base, wait_until="networkidle")
        search = page.locator("input.md-search__input")
        search.click()
        search.press_sequentially("fixed_point", delay=30)
        page.wait_for_selector(".md-search-result__item", timeout=15_000)
        links = page.locator(".md-search-result__link")
        hrefs = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
        meta = page.locator(".md-search-result__meta").inner_text()
        print(f"search 'fixed_point': {meta}; first links: {hrefs[:3]}")
        if not any(h.endswith("#fixpoint.fixed_point") for h in hrefs):
            problems.append("search: `fixpoint.fixed_point`'s API entry is not among the results")

        # The API entry of fp.layers.DEQ renders its arguments.
        current[0] = "api/layers"
        page.goto(base + "api/layers/", wait_until="networkidle")
        entry = page.locator("[id='fixpoint.layers.DEQ']").locator("xpath=..")
        text = entry.inner_text() if entry.count() else ""
        wanted = ["Arguments", "solver", "adjoint", "max_steps"]
        missing = [w for w in wanted if w not in text]
        print(f"fp.layers.DEQ entry: {len(text)} characters; missing {missing or 'nothing'}")
        if not text or missing:
            problems.append(f"api/layers: fp.layers.DEQ entry lacks {missing}")

        if options.shots is not None:
            options.shots.mkdir(parents=True, exist_ok=True)
            for name, path in SHOTS.items():
                page.goto(base + path, wait_until="networkidle")
                if name == "deq":
                    page.locator("[id='fixpoint.layers.DEQ']").scroll_into_view_if_needed()
                page.screenshot(path=str(options.shots / f"{name}.png"))
            print(f"screenshots in {options.shots}")
        browser.close()
    server.shutdown()

    for problem in problems:
        print("PROBLEM", problem)
    print("check_site:", "failed" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
