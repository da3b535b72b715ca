"""ifa_tf: rank whole candidate sets against entire lifelong behaviour sequences."""
