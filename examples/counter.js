// A counter kept in memory. Its state survives restarts because the VM
// rebuilds it by replaying the call log.
let count = 0

exports.increment = (by = 1) => {
  if (typeof by !== 'number' || !Number.isInteger(by)) throw new TypeError('by must be an integer')
  count += by
  return count
}

exports.get = () => count
