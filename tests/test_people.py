"""The people file: corrections made with `name`, `reject` and the review server stick
through cluster, refine and extend (real photos, real models, a real browser)."""
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DATA, HANG_GUARD_S, requires_data
import sort_faces

pytestmark = requires_data
PEOPLE = ("Tony_Blair", "Hugo_Chavez", "Madonna")


def run(*argv, tmp):
    return sort_faces.main([*argv, "-q", "--log-dir", str(tmp / "logs")])


@pytest.fixture
def thirds(copy_photos, tmp_path):
    """Two thirds of three labeled people under a/, the last third under b/."""
    for person in PEOPLE:
        names = sorted(os.listdir(DATA / "labeled" / person))
        copy_photos(tmp_path / "a", [f"{person}/{n}" for k, n in enumerate(names) if k % 3])
        copy_photos(tmp_path / "b", [f"{person}/{n}" for k, n in enumerate(names) if not k % 3])
    return tmp_path


def people_in(out):
    """{folder: {labeled person, ...}} of a cluster output, from its manifest."""
    m = json.loads((out / "manifest.json").read_text())
    return {c["name"]: {f["path"].split(os.sep)[-2] for f in c["faces"]} for c in m["clusters"]}


def folder_of(out, person):
    return next(n for n, who in people_in(out).items() if who == {person})


def test_a_name_in_use_needs_merge_and_then_makes_one_person_that_extend_grows(thirds,
                                                                               capsys):
    """Name Tony Blair's folder Alpha; naming Hugo Chavez's folder alpha too is refused (one
    line saying how to merge), --merge makes them one; re-cluster, embed the rest, extend:
    one Alpha folder with both, growing; Madonna untouched."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    assert run("name", str(cache), str(out / folder_of(out, "Tony_Blair")), "Alpha", tmp=t) == 0
    hugo = str(out / folder_of(out, "Hugo_Chavez"))
    capsys.readouterr()
    assert run("name", str(cache), hugo, "alpha", tmp=t) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already named 'Alpha'" in err[0] and "--merge" in err[0], err
    assert run("name", str(cache), hugo, "alpha", "--merge", tmp=t) == 0
    # naming the same folder again is no conflict
    assert run("name", str(cache), str(out / folder_of(out, "Tony_Blair")), "Alpha", tmp=t) == 0
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    m = json.loads((out / "manifest.json").read_text())
    alpha = [c for c in m["clusters"] if "Alpha" in c["name"]]
    assert len(alpha) == 1 and alpha[0]["person"] == "Alpha"
    assert people_in(out)[alpha[0]["name"]] == {"Tony_Blair", "Hugo_Chavez"}
    assert people_in(out)["person_001"] == {"Madonna"}        # unnamed people still numbered
    before = len(os.listdir(out / "Alpha"))
    assert run("embed", str(t / "b"), str(cache), tmp=t) == 0
    assert run("extend", str(cache), str(out), tmp=t) == 0
    assert len(os.listdir(out / "Alpha")) >= before + 6
    assert people_in(out)["Alpha"] == {"Tony_Blair", "Hugo_Chavez"}
    assert people_in(out)["person_001"] == {"Madonna"}


def test_refine_and_export_names_follow_the_person(thirds):
    t, cache = thirds, thirds / "c.npz"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(t / "raw"), tmp=t) == 0
    assert run("name", str(cache), str(t / "raw" / folder_of(t / "raw", "Madonna")),
               "Madonna Ciccone", tmp=t) == 0
    assert run("refine", str(cache), str(t / "sets"), "--min-face-short", "40",
               "--min-faces", "3", tmp=t) == 0
    m = json.loads((t / "sets" / "refine_manifest.json").read_text())
    named = [fs for fs in m["facesets"] if fs.get("person") == "Madonna Ciccone"]
    assert [fs["name"] for fs in named] == ["Madonna Ciccone"]
    assert (t / "sets" / "Madonna Ciccone").is_dir()


def test_rejected_faces_appear_nowhere(thirds):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    folder = out / folder_of(out, "Tony_Blair")
    photo = sorted(p for p in os.listdir(folder) if p.endswith(".jpg") and p[0] != "_")[0]
    assert run("reject", str(cache), str(folder / photo), tmp=t) == 0
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    m = json.loads((out / "manifest.json").read_text())
    files = [f["file"] for c in m["clusters"] for f in c["faces"]] \
        + [f["file"] for f in m["singletons"]]
    assert photo not in files and len(files) >= 30


def test_singletons_are_never_one_person(thirds, capsys):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    (out / "_singletons").mkdir(exist_ok=True)
    capsys.readouterr()
    assert run("name", str(cache), str(out / "_singletons"), "Strangers", tmp=t) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "many different people" in err[0], err
    assert not os.path.exists(str(cache) + ".people.json")


@pytest.mark.parametrize("bad", ["../x", "/abs/x", "../../x", ".sort_faces", "a/b", ".",
                                 "a\0b", "two\nlines", "person_002", "Person_002",
                                 "_singletons", 5, ""])
def test_a_hostile_people_file_is_one_error_line_and_writes_nothing(thirds, bad, capsys):
    """Names, whatever their source, pass one check where they are read: a people file
    naming a person `/abs/x` or `../../x` never makes a step write outside OUT."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a" / "Madonna"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    faces = [sort_faces.face_id(f["sha256"], f["bbox"]) for f in
             json.loads((out / "manifest.json").read_text())["clusters"][0]["faces"]]
    people = {"schema": 1, "people": [{"id": "p1", "name": bad, "groups": [faces]}],
              "not": [], "rejected": []}
    (t / "c.npz.people.json").write_text(json.dumps(people))
    before = sorted(str(p) for p in t.rglob("*") if "logs" not in p.parts)
    for step in (["cluster", str(cache), str(out), "--clean"],
                 ["refine", str(cache), str(t / "ref"), "--min-faces", "2",
                  "--min-face-short", "40"]):
        capsys.readouterr()
        assert run(*step, tmp=t) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "people[0].name" in err[0]
    assert sorted(str(p) for p in t.rglob("*") if "logs" not in p.parts) == before
    assert not (t.parent / "x").exists() and not os.path.exists("/abs")


@pytest.mark.parametrize("damage", [{"rejected": [[1]]}, {"people": [{"id": "p1",
                                                                      "groups": [[1, 2]]}]},
                                    {"people": [{"name": "A", "groups": []}]},
                                    {"not": [{"face": 3}]}, {"people": "x"}, {"schema": 9}])
def test_a_damaged_people_file_is_one_error_line(thirds, damage, capsys):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a" / "Madonna"), str(cache), tmp=t) == 0
    people = {"schema": 1, "people": [], "not": [], "rejected": [], **damage}
    (t / "c.npz.people.json").write_text(json.dumps(people))
    capsys.readouterr()
    assert run("cluster", str(cache), str(out), tmp=t) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {t / 'c.npz.people.json'}: "), err


def test_names_are_one_person_whatever_their_form(thirds):
    """café in NFC and in NFD is one name (one folder); Anna and anna too."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    tony, hugo = (str(out / folder_of(out, p)) for p in ("Tony_Blair", "Hugo_Chavez"))
    assert run("name", str(cache), tony, "cafe\u0301", tmp=t) == 0          # NFD
    assert run("name", str(cache), hugo, "CAF\u00c9", "--merge", tmp=t) == 0
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    named = [c["name"] for c in json.loads((out / "manifest.json").read_text())["clusters"]
             if c.get("person")]
    assert named == ["caf\u00e9"]                                     # NFC, one folder


def test_an_older_people_file_with_case_twins_still_opens(thirds, capsys):
    """A people file from before the case rule naming one person Anna and another anna:
    one warning line per twin, every step still runs, and they are one person (as `name`
    would have made them) until the user names one of them otherwise."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    assert run("name", str(cache), str(out / folder_of(out, "Tony_Blair")), "Anna", tmp=t) == 0
    path = Path(str(cache) + ".people.json")
    data = json.loads(path.read_text())
    m = json.loads((out / "manifest.json").read_text())
    hugo = next(g for g in m["clusters"] if g["name"] == folder_of(out, "Hugo_Chavez"))
    data["people"].append({"id": "p99", "name": "anna", "groups": [[
        sort_faces.face_id(f["sha256"], f["bbox"]) for f in hugo["faces"]]]})
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path}: ") and "'anna'" in err[0] \
        and "'Anna'" in err[0], err
    assert people_in(out)["Anna"] == {"Tony_Blair", "Hugo_Chavez"}
    assert "anna" not in people_in(out)


@pytest.mark.parametrize("bad", ["../x", "_hidden", "person_004", ".x", "a/b", ""])
def test_names_that_cannot_be_folders_are_refused(thirds, bad, capsys):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a" / "Madonna"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    assert run("name", str(cache), str(out / "person_001"), bad, tmp=t) == 1
    assert capsys.readouterr().err.startswith("error:")
    assert not os.path.exists(str(cache) + ".people.json")


# ---------------------------------------------------------------------------- review server
@pytest.fixture
def served(thirds):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    (t / "secret.txt").write_text("not yours")
    os.symlink(t / "secret.txt", out / "link.txt")
    server = sort_faces.ReviewServer(out)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield t, cache, out, server
    server.httpd.shutdown()
    thread.join(10)


#: A client that keeps cookies, as a browser does: the page's link sets the session's
#: token as a cookie and redirects to a URL without it.
_browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())


def _get(url, client=_browser):
    try:
        with client.open(url, timeout=HANG_GUARD_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _post(url, body, client=_browser):
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return _get(req, client)


def test_the_server_needs_the_token_and_serves_only_out(served):
    t, cache, out, server = served
    base = f"http://127.0.0.1:{server.port}"
    tok = f"token={server.token}"
    # nothing without the token, the page (which carries it) least of all
    for path in ("/index.html", "/", "/manifest.json", "/_sf_review.js"):
        status, body = _get(base + path)
        assert status == 403 and server.token.encode() not in body, path
    req = urllib.request.Request(f"{base}/index.html?{tok}")
    plain = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as moved:      # the link: cookie, clean URL
        plain.open(req, timeout=HANG_GUARD_S)
    assert moved.value.code == 303 and moved.value.headers["Location"] == "/index.html"
    assert "HttpOnly" in moved.value.headers["Set-Cookie"]
    assert "SameSite=Strict" in moved.value.headers["Set-Cookie"]
    status, page = _get(f"{base}/index.html?{tok}")
    assert status == 200 and server.token.encode() not in page and b"data-person" in page
    stranger = urllib.request.build_opener()            # another user: no cookie
    assert _post(base + "/api", {"op": "reject", "faces": ["x"]}, stranger)[0] == 403
    assert _post(base + "/api?token=wrong", {"op": "reject", "faces": ["x"]}, stranger)[0] == 403
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/link.txt", "/..%2fsecret.txt",
                 "/" + str(t / "secret.txt"), "/x%00", "/%ff%fe"):
        status, body = _get(f"{base}{path}?{tok}")
        assert status in (400, 404) and b"not yours" not in body, path
    assert not os.path.exists(str(cache) + ".people.json")
    api = f"{base}/api?{tok}"
    v = server.version()
    assert _post(api, {"op": "undo", "version": v})[0] == 400          # nothing to undo
    deep = json.loads("[" * 50 + "]" * 50)
    for body in ({"op": "name", "name": 5, "section": "person_001", "version": v},
                 {"op": "reject", "faces": "abc", "version": v},
                 {"op": "name", "name": "Ok", "version": v},           # no section
                 {"op": "name", "name": "Ok", "section": "_singletons", "version": v},
                 {"op": "merge", "sections": ["_singletons", "person_001"], "version": v},
                 {"op": "name", "name": "Ok", "section": "person_001", "deep": deep}):
        status, reply = _post(api, body)
        assert status in (400, 409), (body, status, reply)
    req = urllib.request.Request(api, b"[" * 100000 + b"]" * 100000, method="POST",
                                 headers={"Content-Type": "application/json"})
    assert _get(req)[0] == 400
    assert not os.path.exists(str(cache) + ".people.json")
    # framing is refused, and the token never reaches the log
    with _browser.open(f"{base}/index.html?{tok}", timeout=HANG_GUARD_S) as r:
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY"
    logs = "".join(p.read_text() for p in (t / "logs").glob("*.log")) \
        + "".join(p.read_text() for p in Path(sort_faces.LOG_DIR).glob("*review*.log"))
    assert server.token not in logs


def test_a_page_older_than_the_result_is_refused(served):
    """Actions name the result they were made on: after `cluster --clean` re-ran, the
    page's Name is refused (409: reload), never applied to whoever is now person_002."""
    t, cache, out, server = served
    api = f"http://127.0.0.1:{server.port}/api?token={server.token}"
    old = server.version()
    assert run("cluster", str(cache), str(out), "--clean", "--top", "1", tmp=t) == 0
    status, reply = _post(api, {"op": "name", "section": "person_001", "name": "Late",
                                "version": old})
    assert status == 409 and b"reload" in reply
    assert not os.path.exists(str(cache) + ".people.json")
    status, _ = _post(api, {"op": "name", "section": "person_001", "name": "Now",
                            "version": server.version()})
    assert status == 200


def test_many_requests_at_once_are_all_answered(served):
    """100 GETs and 40 POSTs at once: every one is answered, no change is refused because
    another request of the same server holds the people file."""
    import concurrent.futures
    t, cache, out, server = served
    base = f"http://127.0.0.1:{server.port}"
    m = json.loads((out / "manifest.json").read_text())
    faces = [sort_faces.face_id(f["sha256"], f["bbox"]) for f in m["singletons"]][:40]
    v = server.version()
    jobs = [lambda: _get(f"{base}/index.html?token={server.token}")[0]] * 100 + [
        (lambda f: lambda: _post(f"{base}/api?token={server.token}",
                                 {"op": "reject", "faces": [f], "version": v})[0])(f)
        for f in faces]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(lambda job: job(), jobs))
    assert codes == [200] * len(jobs)
    assert len(sort_faces.read_people(cache)["rejected"]) == len(faces)


needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="chromium and chromedriver not installed (apt: chromium chromium-driver)")


def chromium(t, width=1280):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={t / f'profile{width}'}", f"--window-size={width},900"):
        opts.add_argument(arg)
    if width < 500:                  # a desktop window is never that narrow: a phone's
        opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {
            "width": width, "height": 844, "pixelRatio": 3}})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


class Page:
    """The live review page in Chromium, driven through its stable hooks."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        self.d, self.By, self.done = driver, By, 0

    def css(self, q, many=False):
        return (self.d.find_elements if many else self.d.find_element)(self.By.CSS_SELECTOR, q)

    def click(self, el, shift=False):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        if shift:
            ActionChains(self.d).key_down(Keys.SHIFT).click(el).key_up(Keys.SHIFT).perform()
        else:
            self.d.execute_script("arguments[0].click()", el)

    def act(self, click):
        """Do one change; wait until the page answered and redrew; its status line."""
        from selenium.webdriver.support.ui import WebDriverWait
        click()
        self.done += 1
        WebDriverWait(self.d, HANG_GUARD_S).until(
            lambda d: d.find_element(self.By.TAG_NAME, "body").get_attribute("data-sf-done")
            == str(self.done))
        status = self.css("#sf-status").text
        assert not status.startswith("error"), status
        return status

    def section(self, person):
        return self.css(f'section[data-person="{person}"]')

    def faces(self, person):
        return [i.get_attribute("data-face") for i in
                self.css(f'section[data-person="{person}"] img[data-face]', many=True)]

    def title(self, person):
        return self.css(f'section[data-person="{person}"] .sf-title').text

    def button(self, action, within=None):
        return (within or self.d).find_element(self.By.CSS_SELECTOR,
                                               f'[data-action="{action}"]')


@needs_chromium
def test_the_live_page_shows_every_change_at_once(served):
    """Name, merge, move, reject, select all, shift-click, "is this …?" accept and decline,
    undo: each shows on the page at once (headings, sections, faces); `cluster --clean`
    then writes what the page showed."""
    from selenium.webdriver.support.ui import Select
    t, cache, out, server = served
    tony, hugo, madonna = (folder_of(out, p) for p in PEOPLE)
    driver = chromium(t)
    page = Page(driver)
    try:
        driver.get(server.url)
        assert "token=" not in driver.current_url           # the link's token: a cookie now
        # name: the heading says so
        page.section(tony).find_element(page.By.CSS_SELECTOR, "input[data-field=name]") \
            .send_keys("Tony")
        page.act(lambda: page.click(page.button("name", page.section(tony))))
        assert page.title(tony) == "Tony"
        assert "Tony" in page.css("#sf-index").text
        # merge: one section holds both
        n_hugo, n_madonna = len(page.faces(hugo)), len(page.faces(madonna))
        for s in (hugo, madonna):
            page.click(page.section(s).find_element(page.By.CSS_SELECTOR,
                                                    "input[data-field=merge]"))
        page.act(lambda: page.click(page.button("merge")))
        merged = [p for p in (hugo, madonna) if page.css(f'section[data-person="{p}"]', True)]
        assert len(merged) == 1 and len(page.faces(merged[0])) == n_hugo + n_madonna
        # shift-click selects a range; move it to a new person: it shows there, not here
        imgs = page.css(f'section[data-person="{tony}"] img[data-face]', many=True)
        page.click(imgs[0])
        page.click(imgs[2], shift=True)
        assert page.css("#sf-count").text == "3 selected"
        moved = [i.get_attribute("data-face") for i in imgs[:3]]
        Select(page.css("#sf-target")).select_by_value("")
        page.css("#sf-newname").send_keys("Moved")
        page.act(lambda: page.click(page.button("move")))
        assert not set(moved) & set(page.faces(tony))
        assert set(page.faces("Moved")) == set(moved) and page.title("Moved") == "Moved"
        # select all of one person, then reject: its faces leave the page
        page.click(page.button("select-all", page.section("Moved")))
        assert page.css("#sf-count").text == "3 selected"
        page.act(lambda: page.click(page.button("reject")))
        assert not page.css('section[data-person="Moved"]', True)
        assert not set(moved) & set(page.css("img[data-face]", True) and
                                    [i.get_attribute("data-face") for i in
                                     page.css("img[data-face]", True)])
        # undo brings them back, where they were
        assert page.act(lambda: page.click(page.button("undo"))).startswith("undo #")
        assert set(page.faces("Moved")) == set(moved)
        # "is this …?": accept joins the person, decline records not-this-person
        sugg = page.css('section[data-person="_singletons"] figure', many=True)
        if sugg:
            fig = sugg[0]
            face = fig.find_element(page.By.CSS_SELECTOR, "img").get_attribute("data-face")
            to = fig.get_attribute("data-to")
            page.act(lambda: page.click(page.button("accept", fig)))
            assert face in page.faces(to) and face not in page.faces("_singletons")
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
    finally:
        driver.quit()
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    m = json.loads((out / "manifest.json").read_text())
    ids = {c["name"]: {sort_faces.face_id(f["sha256"], f["bbox"]) for f in c["faces"]}
           for c in m["clusters"]}
    who = people_in(out)
    assert who["Tony"] == {"Tony_Blair"} and not set(moved) & ids["Tony"]
    assert ids["Moved"] == set(moved)
    assert len([n for n, w in who.items() if w == {"Hugo_Chavez", "Madonna"}]) == 1


@needs_chromium
def test_suggestions_declined_go_away_and_undo_survives_a_restart(thirds):
    """A singleton the rule would join to a person is asked about ("Is this …?"); No
    records not-this-person and the question goes; a new server (a restart) still undoes
    the last change."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    # a tight first stage leaves faces of the three people alone: the rule's stage 3 would
    # join them, so the page asks
    assert run("cluster", str(cache), str(out), "--join-threshold", "0", tmp=t) == 0
    for restart in (False, True):
        server = sort_faces.ReviewServer(out)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        driver = chromium(t)
        page = Page(driver)
        try:
            driver.get(server.url)
            if not restart:
                figs = page.css('section[data-person="_singletons"] figure', many=True)
                assert figs, "no suggestion"
                face = figs[0].find_element(page.By.CSS_SELECTOR, "img").get_attribute(
                    "data-face")
                page.act(lambda: page.click(page.button("decline", figs[0])))
                left = [f.find_element(page.By.CSS_SELECTOR, "img").get_attribute("data-face")
                        for f in page.css('section[data-person="_singletons"] figure', True)]
                assert face not in left and face in page.faces("_singletons")
            else:
                status = page.act(lambda: page.click(page.button("undo")))
                assert status.startswith("undo #"), status
                again = [f.find_element(page.By.CSS_SELECTOR, "img").get_attribute("data-face")
                         for f in page.css('section[data-person="_singletons"] figure', True)]
                assert face in again
        finally:
            driver.quit()
            server.httpd.shutdown()
            thread.join(10)


@needs_chromium
def test_the_page_fits_a_phone_and_finds_people(served):
    """At 390 px: no horizontal scroll, every control at least 40 px tall and wide; the
    search and hide controls narrow the page; a screenshot at both widths for a person to
    look at (work/logs/review_*.png)."""
    t, cache, out, server = served
    shots = Path(sort_faces.LOG_DIR)
    shots.mkdir(parents=True, exist_ok=True)
    for width in (1280, 390):
        driver = chromium(t, width)
        page = Page(driver)
        try:
            driver.get(server.url)
            driver.save_screenshot(str(shots / f"review_{width}.png"))
            inner, wide = driver.execute_script(
                "return [window.innerWidth, document.documentElement.scrollWidth]")
            assert inner == width and wide <= width, (width, inner, wide)
            small = driver.execute_script(
                "return [...document.querySelectorAll('button, select, input:not([type=checkbox])"
                ", #sf-index a')].filter(e => e.offsetParent).map(e => e.getBoundingClientRect())"
                ".filter(r => r.height < 40 || r.width < 40).length")
            assert small == 0, (width, small)
            people = page.css("section[data-person]", many=True)
            page.css("#sf-search").send_keys(page.title(folder_of(out, "Madonna")))
            shown = [s for s in page.css("section[data-person]", many=True) if s.is_displayed()]
            assert len(shown) == 1 < len(people)
            page.css("#sf-search").clear()
            driver.execute_script("document.getElementById('sf-search')"
                                  ".dispatchEvent(new Event('input', {bubbles: true}))")
            page.click(page.button("hide", page.section(folder_of(out, "Hugo_Chavez"))))
            assert not page.section(folder_of(out, "Hugo_Chavez")).is_displayed()
            driver.execute_script("localStorage.clear()")
        finally:
            driver.quit()


def test_undo_reverts_one_change_by_its_inverse_and_keeps_later_ones(thirds, capsys):
    """name, reject, then undo the name (from the CLI, in a later process): the name is
    gone, the later reject stays; undo of the undo brings the name back; `people` lists
    the journal; a CLI reject made between two page actions is never lost."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    tony, madonna = (out / folder_of(out, p) for p in ("Tony_Blair", "Madonna"))
    assert run("name", str(cache), str(tony), "Tony", tmp=t) == 0
    photo = sorted(p for p in os.listdir(madonna) if p.endswith(".jpg") and p[0] != "_")[0]
    assert run("reject", str(cache), str(madonna / photo), tmp=t) == 0
    assert run("undo", str(cache), "1", tmp=t) == 0
    data = sort_faces.read_people(cache)
    assert not [r for r in data["people"] if r.get("name")]        # the name is undone
    assert len(data["rejected"]) == 1                              # the later reject stays
    assert run("cluster", str(cache), str(out), "--clean", tmp=t) == 0
    assert "Tony" not in people_in(out) and folder_of(out, "Tony_Blair") == tony.name
    assert run("undo", str(cache), "3", tmp=t) == 0                # redo: undo the undo
    assert [r["name"] for r in sort_faces.read_people(cache)["people"]] == ["Tony"]
    capsys.readouterr()
    assert run("people", str(cache), tmp=t) == 0
    lines = capsys.readouterr().out.splitlines()
    # the redo stands #1 again (no longer marked undone) and marks the undo it reverted
    assert any(line.startswith("#1\t") and "undone" not in line for line in lines), lines
    assert any(line.startswith("#3\t") and "[undone by #4]" in line for line in lines), lines
    assert any(line.startswith("#4\t") and "undo #3" in line for line in lines), lines
    assert run("undo", str(cache), "3", tmp=t) == 1                # already undone


def test_the_pages_undo_reverts_its_own_change_and_keeps_a_cli_reject(served):
    t, cache, out, server = served
    base = f"http://127.0.0.1:{server.port}/api?token={server.token}"
    tony = folder_of(out, "Tony_Blair")
    assert _post(base, {"op": "name", "section": tony, "name": "Tony",
                        "version": server.version()})[0] == 200
    madonna = out / folder_of(out, "Madonna")
    photo = sorted(p for p in os.listdir(madonna) if p.endswith(".jpg") and p[0] != "_")[0]
    assert run("reject", str(cache), str(madonna / photo), tmp=t) == 0      # meanwhile
    status, body = _post(base, {"op": "undo", "version": server.version()})
    assert status == 200, body
    assert b"undo #1" in body
    data = sort_faces.read_people(cache)
    assert not [r for r in data["people"] if r.get("name")] and len(data["rejected"]) == 1


def _ids(n):
    return [f"{k:064x}:0.0,0.0,10.0,10.0" for k in range(n)]


def test_undo_never_puts_faces_into_a_person_made_later():
    """Ids are never reissued: undoing a reject of an unnamed person that has since gone
    does not hand its faces to the person who took its place."""
    data = sort_faces.read_people("/nonexistent/c.npz")
    x, z = _ids(3), _ids(6)[3:]
    for op, what, act in (("merge", "x", lambda: sort_faces.people_name(data, x, None)),
                          ("reject", "x", lambda: sort_faces.people_reject(data, x)),
                          ("name", "z", lambda: sort_faces.people_name(data, z, "Bob"))):
        before = sort_faces._state(data)
        act()
        sort_faces._log_change(data, before, op, what)
    sort_faces.people_undo(data, 2)
    bob = next(r for r in data["people"] if r["name"] == "Bob")
    assert sorted(f for g in bob["groups"] for f in g) == sorted(z)
    assert data["rejected"] == [] and any(set(x) <= {f for g in r["groups"] for f in g}
                                          for r in data["people"] if r is not bob)


def test_undo_keeps_faces_that_only_changed_group_and_redo_restores_not_links():
    data = sort_faces.read_people("/nonexistent/c.npz")
    a, b, c = _ids(3)

    def change(op, act):
        before = sort_faces._state(data)
        act()
        return sort_faces._log_change(data, before, op, op)
    change("name", lambda: sort_faces.people_name(data, [a, b, c], "Alice"))
    change("reject", lambda: sort_faces.people_reject(data, [a]))   # the group's first face
    sort_faces.people_undo(data, 1)            # b and c only changed group: undone fully
    assert not [r for r in data["people"] if r.get("name")] and data["rejected"] == [a]
    assert not [r for r in data["people"] if {b, c} & {f for g in r["groups"] for f in g}]
    # a move records a not-together link; undo drops it, redo (undo the undo) brings it back
    n = change("move", lambda: sort_faces.people_move(data, [b], [], None, [c]))
    assert data["not"]
    sort_faces.people_undo(data, n)
    assert not data["not"]
    sort_faces.people_undo(data, n + 1)
    assert data["not"] == [{"face": b, "faces": [c]}]


def test_renaming_a_person_frees_the_old_name(thirds, capsys):
    """Rename Madonna's folder twice: the first name is free again (no empty person keeps
    it), and naming a folder what it is called already records no change."""
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    madonna, tony = (str(out / folder_of(out, p)) for p in ("Madonna", "Tony_Blair"))
    for name in ("Madonna", "Madonna Ciccone", "Madonna Ciccone"):
        assert run("name", str(cache), madonna, name, tmp=t) == 0
    data = sort_faces.read_people(cache)
    assert [r["name"] for r in data["people"]] == ["Madonna Ciccone"]
    assert len(data["journal"]) == 2
    assert run("name", str(cache), tony, "Madonna", tmp=t) == 0      # the old name is free
    capsys.readouterr()
    assert run("name", str(cache), tony, "tab\there", tmp=t) == 1
    assert "not printable" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [{"next_id": "x"}, {"next_id": None}, {"people": "DEEP"}])
def test_a_damaged_people_file_field_is_one_error_line(thirds, damage, capsys):
    t, cache = thirds, thirds / "c.npz"
    assert run("embed", str(t / "a" / "Madonna"), str(cache), tmp=t) == 0
    people = {"schema": 1, "people": [], "not": [], "rejected": []}
    text = json.dumps({**people, **damage}).replace('"DEEP"', "[" * 5000 + "]" * 5000)
    (t / "c.npz.people.json").write_text(text)
    for argv in (["cluster", str(cache), str(t / "out")], ["people", str(cache)]):
        capsys.readouterr()
        assert run(*argv, tmp=t) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_missing_things_get_their_own_reason(thirds, capsys):
    t, cache, out = thirds, thirds / "c.npz", thirds / "out"
    assert run("embed", str(t / "a" / "Madonna"), str(cache), tmp=t) == 0
    assert run("cluster", str(cache), str(out), tmp=t) == 0
    for argv, why in ((["reject", str(cache), str(out / "nonexistent.jpg")], "no such file"),
                      (["name", str(cache), str(out), "All"], "whole output"),
                      (["people", str(t / "nope.npz")], "cache not found")):
        capsys.readouterr()
        assert run(*argv, tmp=t) == 1
        assert why in capsys.readouterr().err, argv


def test_the_page_never_shows_two_people_as_one(served):
    """Most of a person moved to a new, unnamed person: the page shows two people, the
    moved faces in the new one and the rest where they were; naming the rest names only
    them."""
    t, cache, out, server = served
    api = f"http://127.0.0.1:{server.port}/api?token={server.token}"
    tony = folder_of(out, "Tony_Blair")
    sections = {s["person"]: [server.fid(i) for i in s["faces"]] for s in server.view()[0]}
    faces = sections[tony]
    moved = faces[:len(faces) * 2 // 3]
    status, body = _post(api, {"op": "move", "faces": moved, "from": [tony] * len(moved),
                               "to": "", "version": server.version()})
    assert status == 200, body
    after = {s["person"]: set(server.fid(i) for i in s["faces"]) for s in server.view()[0]}
    assert after[tony] == set(faces) - set(moved)
    new = [k for k, v in after.items() if v == set(moved)]
    assert len(new) == 1 and new[0] != tony
    assert _post(api, {"op": "name", "section": tony, "name": "Rest",
                       "version": server.version()})[0] == 200
    titles = {s["person"]: s["title"] for s in server.view()[0]}
    assert titles[tony] == "Rest" and titles[new[0]] != "Rest"
