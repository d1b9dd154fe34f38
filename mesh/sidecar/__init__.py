"""The sidecar: registers its worker, guards its door (mTLS, authorization, limits), traces its calls."""
