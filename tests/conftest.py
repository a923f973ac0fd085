import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CONDIFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "condiff"))
