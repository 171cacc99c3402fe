// A key server with admins. Anyone can read keys; only admins can change them.
// While there are no admins, the first caller of setAdmins sets the admin list
// (to whatever it passes: it need not include itself). The list is never empty
// again: an empty one would let the next caller, anyone, take over.
async function readJSON (path, fallback) {
  try {
    return JSON.parse(await System.files.readFile(path))
  } catch (e) {
    if (e.name === 'NotFoundError') return fallback
    throw e
  }
}

async function requireAdmin () {
  const admins = await readJSON('/admins.json', [])
  if (!System.caller.id || !admins.includes(System.caller.id)) {
    const err = new Error('only admins may do this')
    err.name = 'PermissionDenied'
    throw err
  }
}

function checkName (name) {
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.@-]{1,64}$/.test(name) ||
      name === '.' || name === '..') {
    throw new TypeError('key names are 1-64 letters, digits, or _ . @ - (not . or ..)')
  }
}

exports.init = async () => {
  await System.files.mkdir('/keys')
  await System.files.writeFile('/admins.json', '[]')
}

exports.setAdmins = async (admins) => {
  if (!Array.isArray(admins) || admins.length === 0 ||
      !admins.every(a => typeof a === 'string')) {
    throw new TypeError('admins must be a non-empty list of user ids')
  }
  const current = await readJSON('/admins.json', [])
  if (current.length > 0) await requireAdmin()
  else if (!System.caller.id) throw new TypeError('anonymous callers cannot claim admin')
  await System.files.writeFile('/admins.json', JSON.stringify(admins))
}

exports.getAdmins = () => readJSON('/admins.json', [])

exports.setKey = async (name, key) => {
  await requireAdmin()
  checkName(name)
  if (typeof key !== 'string') throw new TypeError('key must be a string')
  await System.files.writeFile('/keys/' + name, key)
}

exports.getKey = async (name) => {
  checkName(name)
  try {
    return await System.files.readFile('/keys/' + name)
  } catch (e) {
    if (e.name === 'NotFoundError') return null
    throw e
  }
}

exports.delKey = async (name) => {
  await requireAdmin()
  checkName(name)
  await System.files.unlink('/keys/' + name)
}

exports.listKeys = () => System.files.readdir('/keys')
