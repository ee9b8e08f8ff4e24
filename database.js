// Package entry: the generated binding plus the ready-made `eventRepository` of the design,
// which reads DATABASE_URL at its first call (importing never throws).
module.exports = require('./index.js')
module.exports.eventRepository = new module.exports.EventRepository()
