// Returns the caller's id: a plain name in debug mode, an Ed25519 user id in signed mode.
exports.whoami = () => System.caller.id || 'anonymous'
