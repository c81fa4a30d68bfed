"""The online path: the BentoML service, the request pipeline behind /recommend (cache, features,
candidates, scoring, rules, answer) and the precompute job."""
