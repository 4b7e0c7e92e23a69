"""Shadow traffic: copies of live requests answered by a route's shadow variant, never returned to anyone, each
recorded beside the request it copied (`copies`), and the paired comparison of the two (`pairs`)."""
